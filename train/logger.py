"""TensorBoard (tensorboardX, no TensorFlow) and console logging; process 0 writes, others are silent."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from train import storage

log = logging.getLogger("hnet")


def setup_console():
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src", "grain", "gcsfs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricWriter:
    """TensorBoard events in ``logdir``; a remote (gs://) logdir gets them written locally and uploaded at
    most every ``UPLOAD_SECS`` and at flush / close."""

    UPLOAD_SECS = 30

    def __init__(self, logdir: str):
        self.enabled = jax.process_index() == 0
        self.logdir = logdir
        self.tb, self.local, self.uploaded = None, None, time.time()
        if self.enabled:
            from tensorboardX import SummaryWriter

            storage.make_dirs(logdir)
            if storage.is_remote(logdir):
                self.local = tempfile.mkdtemp(prefix="hnet-tb-")
            self.tb = SummaryWriter(self.local or logdir, flush_secs=10)

    def _upload(self, force: bool = False):
        if self.local and (force or time.time() - self.uploaded > self.UPLOAD_SECS):
            self.tb.flush()
            storage.upload([os.path.join(self.local, f) for f in sorted(os.listdir(self.local))], self.logdir)
            self.uploaded = time.time()

    def scalars(self, step: int, values: dict, prefix: str = ""):
        """NaN means "undefined in this window" (e.g. a MAGNET route with no byte in the batch) and is not
        written; a non-finite loss is counted by the train step's ``skipped_steps`` scalar instead."""
        if self.tb:
            for k, v in values.items():
                if not math.isnan(v := float(v)):
                    self.tb.add_scalar(f"{prefix}{k}", v, step)
            self._upload()

    def text(self, step: int, tag: str, text: str):
        if self.tb:
            # Markdown: keep line breaks and make the text monospaced.
            self.tb.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def histogram(self, step: int, tag: str, values):
        if self.tb and np.size(values):
            self.tb.add_histogram(tag, np.asarray(values), step)

    def flush(self):
        if self.tb:
            self.tb.flush()
            self._upload(force=True)

    def close(self):
        if self.tb:
            self.tb.close()
            self._upload(force=True)
            if self.local:
                shutil.rmtree(self.local, ignore_errors=True)


class Progress:
    """Console line: step, loss, BPB, bytes/s, ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.t0, self.s0 = total_steps, time.time(), start_step

    def line(self, step: int, m: dict, bytes_per_s: float) -> str:
        done = step - self.s0
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        extra = "".join(f" {k} {m[k]:.3g}" for k in ("bytes_per_chunk_s0", "bytes_per_chunk_s1", "deletion_rate")
                        if k in m)
        return (f"step {step:>6d}/{self.total} loss {m['loss']:.4f} bpb {m['bpb']:.4f} "
                f"lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f}{extra} | {bytes_per_s:,.0f} bytes/s | ETA {eta/60:.1f} min")
