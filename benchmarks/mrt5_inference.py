"""Causal MrT5 inference: forward time with hard deletion vs without deletion, same weights, long inputs.

    .venv/bin/python benchmarks/mrt5_inference.py --workdir runs/mrt5_ts --seq_len 4096 --batch 1 --reps 5

Restores a trained causal MrT5 (its operative config + latest checkpoint) and takes ``batch`` windows of
``seq_len`` bytes from its eval split. Both forms run the jitted encoder + gate, then the jitted
backbone + decoder (``MrT5CausalLM.hard_logits``):
  none  every real byte kept, backbone over M = L slots (the model without deletion);
  hard  the kept bytes (G > k/2) compacted into M slots, M = the most kept bytes of a row rounded up to a
        multiple of ``--bucket``: read on the host between the two calls, as a server buckets lengths.
Timed: median wall seconds of ``--reps`` runs after a warm-up (compile excluded), the host sync included.
Also reported: the deletion rate on these windows and the hard-deletion BPB. Prints a table and writes
``benchmarks/out/mrt5_inference.json``, with the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hnet import sharding
from models.base import ModelOutput
from train import data as data_lib
from train.metrics import bpb
from train.restore import load_config, query, restore_setup
from train.step import cross_entropy_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_time(fn, reps: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/out/mrt5_inference.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()

    load_config(args.workdir)
    eval_cfg = dataclasses.replace(query("train.train.eval_data"), seq_len=args.seq_len, batch_size=args.batch)
    docs, _ = data_lib.load_documents(eval_cfg)
    batch = {k: jnp.asarray(v) for k, v in next(data_lib.iterate_eval_batches(eval_cfg, docs)).items()}
    setup, step = restore_setup(args.workdir)
    graphdef, params, rest = setup.graphdef, setup.state.params, setup.state.rest
    L = args.seq_len

    def model():  # merged inside each jitted function: the attention layers write non-param state
        m = nnx.merge(graphdef, params, rest)
        m.eval()
        return m

    encode = jax.jit(lambda b: model().encode(b))
    backbone = jax.jit(lambda h, keep, seg, pos, M: model().hard_logits(h, keep, seg, pos, M), static_argnums=4)
    seg, pos = batch["segment_ids"], batch["positions"]
    real = seg > 0

    def capacity(keep) -> int:  # on the host: a concrete array, not a traced value
        n = int(np.asarray(jnp.sum(keep, axis=1)).max())
        return min(L, -(-n // args.bucket) * args.bucket)

    def run_none():
        h, _, _ = encode(batch)
        return jax.block_until_ready(backbone(h, real, seg, pos, L))

    def run_hard():
        h, _, keep = encode(batch)
        return jax.block_until_ready(backbone(h, keep, seg, pos, capacity(keep)))

    with sharding.mesh_context(setup.mesh):
        _, _, keep = encode(batch)
        M = capacity(keep)
        deleted = float(jnp.sum(real & ~keep) / jnp.sum(real))
        s = cross_entropy_sums(ModelOutput(run_hard()), batch)
        hard_bpb = bpb(s["byte_nll_sum"], s["n_bytes"])
        t_none, t_hard = median_time(run_none, args.reps), median_time(run_hard, args.reps)
    res = {"workdir": os.path.abspath(args.workdir), "step": step, "seq_len": L, "batch": args.batch,
           "reps": args.reps, "deletion_rate": deleted, "backbone_slots_hard": M, "backbone_slots_none": L,
           "hard_bpb": hard_bpb, "none_s": t_none, "hard_s": t_hard, "speedup": t_none / t_hard,
           "load_before": load_before, "load_after": os.getloadavg(), "threads": len(os.sched_getaffinity(0))}
    print(f"| L | B | deleted | backbone slots | no deletion (ms) | hard deletion (ms) | speed-up | load 1 min |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {L} | {args.batch} | {deleted:.3f} | {M} / {L} | {t_none * 1e3:.0f} | {t_hard * 1e3:.0f} | "
          f"{t_none / t_hard:.2f}x | {load_before[0]:.1f}→{res['load_after'][0]:.1f} |")
    print(f"hard-deletion BPB on these windows: {hard_bpb:.4f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # time the runtime the CLIs use (train/malloc.py)
    main()
