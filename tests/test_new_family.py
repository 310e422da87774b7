"""A newcomer's family (issue 17, item 7): LineLM, defined only here plus a gin string, trains, evaluates, samples
and appears in a sweep table with no other file changed: no registry, no list, no generation special case.

LineLM, an H-Net-shaped hourglass with a fixed rule, built from hnet/ primitives and models.common (the shared
model toolkit): a chunk opens at every document start and after every newline (``end_to_start`` of
e_t = [x_t = '\\n']).
    h = encoder(embed(x)) ; z = compact(h, starts, M) ; o = main(z) over the chunks (chunk index in its document as
    position) ; logits = head(decoder(h + expand(o, starts))).
Byte t reads the chunk that contains it, whose representative is its start byte s <= t: causal. Chunks past the
M = ceil(capacity L) slots of a row are dropped and their bytes' targets masked (eval mode: M = L).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import end_to_start
from hnet.layers import Stack, StackConfig
from models.base import ByteLM, ModelOutput, capacity_slots
from models.common import byte_embed, chunk_layout, lm_head, masked_update
from tests.helpers import REPO_ROOT, pydoc_bytes

NEWLINE = ord("\n")


class LineLM(ByteLM):
    """Hourglass whose chunks are lines; registered with gin as ``models.LineLM`` by subclassing ByteLM."""

    def __init__(self, encoder: StackConfig, main: StackConfig, decoder: StackConfig, *, capacity: float = 0.5,
                 seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.capacity, self.deterministic = capacity, False  # model.eval() sets deterministic: M = L
        self.embed = byte_embed(encoder.d_model, jnp.float32, rngs)
        self.encoder = Stack(encoder, rngs=rngs)
        self.main = Stack(main, length_axis="chunk_len", rngs=rngs)
        self.decoder = Stack(decoder, rngs=rngs)
        self.head = lm_head(decoder.d_model, jnp.float32, jnp.float32, rngs)

    def __call__(self, batch) -> ModelOutput:
        x_BxL, seg_BxL, pos_BxL = batch["inputs"], batch["segment_ids"], batch["positions"]
        M = capacity_slots(self.capacity, x_BxL.shape[1], self.deterministic)
        h_BxLxD = self.encoder(self.embed(x_BxL), seg_BxL, pos_BxL)
        starts_BxL = end_to_start(x_BxL == NEWLINE, seg_BxL)
        lay = chunk_layout(starts_BxL, seg_BxL, M)  # chunk segment ids, chunk index in its document, overflow
        z_BxMxD, _ = chunking.compact(h_BxLxD, starts_BxL, M)
        o_BxMxD = self.main(z_BxMxD, lay.seg_BxM, lay.pos_BxM)
        y_BxLxD = self.decoder(h_BxLxD + chunking.expand(o_BxMxD, starts_BxL), seg_BxL, pos_BxL)
        return ModelOutput(logits_BxLxV=self.head(y_BxLxD).astype(jnp.float32),
                           target_mask_BxL=lay.byte_ok_BxL | (seg_BxL == 0), boundaries={"s0": starts_BxL})

    def init_cache(self, batch_size: int, max_len: int):
        B, M = batch_size, capacity_slots(self.capacity, max_len, self.deterministic)
        return {"encoder": self.encoder.init_cache(B, max_len), "main": self.main.init_cache(B, M),
                "decoder": self.decoder.init_cache(B, max_len), "o": jnp.zeros((B, self.main.cfg.d_model)),
                "after_newline": jnp.zeros((B,), bool), "chunks": jnp.zeros((B,), jnp.int32),
                "cap": jnp.full((B,), M, jnp.int32)}

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        c = dict(cache)
        h_BxD, c["encoder"] = self.encoder.step(self.embed(tokens_B), c["encoder"], reset_B)
        start_B = reset_B | c["after_newline"]
        fits_B = start_B & (c["chunks"] < c["cap"])
        o_BxD, main = self.main.step(h_BxD, c["main"], reset_B)
        c["main"] = masked_update(main, c["main"], fits_B)
        c["o"] = jnp.where(start_B[:, None], jnp.where(fits_B[:, None], o_BxD, 0.0), c["o"])
        c["chunks"], c["after_newline"] = c["chunks"] + start_B, tokens_B == NEWLINE
        y_BxD, c["decoder"] = self.decoder.step(h_BxD + c["o"], c["decoder"], reset_B)
        return self.head(y_BxD).astype(jnp.float32), c


MODEL_GIN = """\
import tests.test_new_family
train.train.model = @models.LineLM
models.LineLM.encoder = @local/hnet.StackConfig()
models.LineLM.main = @main/hnet.StackConfig()
models.LineLM.decoder = @local/hnet.StackConfig()
local/hnet.StackConfig.layout = 'T1'
local/hnet.StackConfig.d_model = 32
local/hnet.StackConfig.d_ff = 64
local/hnet.StackConfig.num_heads = 2
main/hnet.StackConfig.layout = 'T1'
main/hnet.StackConfig.d_model = 32
main/hnet.StackConfig.d_ff = 64
main/hnet.StackConfig.num_heads = 2
"""
PROMPTS = (pydoc_bytes("lambda", 20).decode(), pydoc_bytes("pass", 24).decode())  # each with a line break
CHEAP = ["TRAIN_STEPS = 2", "SEQ_LEN = 64", "BATCH = 2", "eval/train.DataConfig.max_windows = 2",
         "train.train.sample_bytes = 12", "train.train.log_every = 1", f"train.train.sample_prompts = {PROMPTS!r}"]
SWEEP_GIN = """\
sweep.Sweep.name = 'newcomer'
sweep.Sweep.models = ('{model}',)
sweep.Sweep.run_files = ('configs/runs/default.gin',)
sweep.Sweep.variants = {{'': {bindings!r}}}
sweep.Sweep.eval_args = ('--robustness_bytes=0',)
"""


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """The sweep of one run (line_tiny-s0) trained here with ``train_from_config`` in the sweep's workdir, so
    ``train.sweep.execute`` only evaluates it (``python -m train.evaluate``: a fresh process that knows LineLM
    through the ``import`` line of the operative config) -> (runs, sweep out dir, train results)."""
    import gin

    from train import sweep
    from train.main import train_from_config

    tmp = tmp_path_factory.mktemp("newcomer")
    model_gin = tmp / "line_tiny.gin"
    model_gin.write_text(MODEL_GIN)
    sweep_gin = tmp / "newcomer.gin"
    sweep_gin.write_text(SWEEP_GIN.format(model=model_gin, bindings=CHEAP))
    gin.clear_config()
    runs = sweep.expand(sweep.load_sweep(str(sweep_gin)), str(tmp / "sweeps"))
    (run,) = runs
    res = train_from_config([str(model_gin), os.path.join(REPO_ROOT, "configs/runs/default.gin")],
                            CHEAP + ["train.train.seed = 0"], run.workdir)
    gin.clear_config()
    assert sweep.trained(run)  # the sweep's own train.main would be skipped
    status = sweep.execute(runs)
    assert status == {run.name: "done"}, open(os.path.join(run.workdir, "eval.log")).read()[-3000:]
    out_dir = os.path.join(str(tmp / "sweeps"), "newcomer")
    sweep.collect(runs, out_dir)
    return run, out_dir, res


def test_it_trains_and_samples(sweep_run):
    run, _, res = sweep_run
    on_disk = json.loads(open(os.path.join(run.workdir, "results.json")).read())
    assert on_disk["final_step"] == 2 and all(np.isfinite(h["loss"]) for h in on_disk["history"])
    assert np.isfinite(on_disk["eval"]["bpb"]) and on_disk["eval"]["n_masked_by_model"] == 0
    assert [s[:len(p)] for s, p in zip(on_disk["samples"], PROMPTS)] == list(PROMPTS)
    assert "import tests.test_new_family" in open(os.path.join(run.workdir, "operative_config.gin")).read()
    assert isinstance(res["setup"].model, LineLM)


def test_decoding_equals_the_forward(sweep_run):
    """train.generate (LineLM.decode_step, one byte at a time) sees the logits of the eval-mode forward."""
    from hnet.sharding import mesh_context
    from train.generate import generate_arrays

    setup = sweep_run[2]["setup"]
    with mesh_context(setup.mesh):
        model = nnx.merge(setup.graphdef, setup.state.params, setup.state.rest)
        _, fed_BxT, logits_BxTxV = generate_arrays(model, [p.encode() for p in PROMPTS], max_new_bytes=12,
                                                   temperature=0.0)
        model.eval()
        B, T = fed_BxT.shape
        out = model({"inputs": jnp.asarray(fed_BxT), "segment_ids": jnp.ones((B, T), jnp.int32),
                     "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1))})
    assert np.asarray(out.boundaries["s0"]).sum(1).min() >= 2  # the prompts' line breaks opened chunks
    np.testing.assert_allclose(logits_BxTxV, np.asarray(out.logits_BxLxV), rtol=0, atol=1e-5)


def test_it_is_evaluated_and_in_the_sweep_table(sweep_run):
    run, out_dir, _ = sweep_run
    ev = json.loads(open(os.path.join(run.workdir, "eval", "eval.json")).read())
    last = ev["checkpoints"][max(ev["checkpoints"], key=int)]["corpora"]["eval"]
    assert np.isfinite(last["bpb"]) and last["bytes_per_chunk"]["s0"] > 1
    (row,) = json.loads(open(os.path.join(out_dir, "sweep.json")).read())
    assert row["run"] == "line_tiny-s0" and row["bpb"] == last["bpb"]
    assert "| line_tiny-s0 |" in open(os.path.join(out_dir, "sweep.md")).read()


def test_the_gin_import_line_registers_the_family_in_a_fresh_process():
    """What the sweep's ``python -m train.main`` relies on: parsing the model file imports this module."""
    code = ("import sys; from train import config; config.parse(sys.argv[1:], []); "
            "import gin; print(gin.query_parameter('train.train.model').selector)")
    with tempfile.NamedTemporaryFile("w", suffix=".gin") as f:
        f.write(MODEL_GIN)
        f.flush()
        p = subprocess.run([sys.executable, "-c", code, f.name, "configs/runs/default.gin"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.split()[-1] == "models.LineLM", p.stderr[-3000:]
