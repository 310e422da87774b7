"""Train-step time of variants of one config, compiled in one process and timed in alternating rounds
(A, B, C, A, B, C, ...) so that machine load hits all alike: the dense attention ("dense", the baseline),
the blockwise kernel (one variant per --block_q) and gin bindings (--variant NAME=BINDING, dense attention).

    .venv/bin/python benchmarks/ab_step.py --config isotropic_tiny --seq_len 1024 --rounds 3
    # peak RSS of the blockwise path alone (no dense compile in the process)
    .venv/bin/python benchmarks/ab_step.py --config isotropic_tiny --seq_len 8192 --only blockwise
    # Mamba-2 chunk size
    .venv/bin/python benchmarks/ab_step.py --config hnet_1stage_tiny --block_q --variant \
        chunk32=models.HNetConfig.ssm_chunk_size=32

Each variant is compiled with hnet.attention's CPU rule forced ('dense' for the baseline and the gin
variants, 'blockwise' with the given block sizes), so the comparison does not depend on the automatic
length threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (same directory)


@contextlib.contextmanager
def attention_kernel(impl: str, **kernel_kw):
    """Every self-attention of the compiled step through ``impl`` ('dense' | 'blockwise', the latter with
    ``kernel_kw`` such as block_q / skip_padding), whatever hnet.attention's automatic rule would pick."""
    import functools

    from hnet import attention

    saved = attention.BLOCKWISE_MIN_LEN, dict(attention._KERNELS)
    attention.BLOCKWISE_MIN_LEN = 1 if impl == "blockwise" else 1 << 62
    attention._KERNELS["blockwise"] = functools.partial(saved[1]["blockwise"], **kernel_kw)
    try:
        yield
    finally:
        attention.BLOCKWISE_MIN_LEN = saved[0]
        attention._KERNELS.update(saved[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="isotropic_tiny")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--bytes_per_step", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block_q", type=int, nargs="*", default=[0],
                    help="one blockwise variant per value (0: the kernel's own tile sizes)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=BINDING: a dense variant with a gin binding")
    ap.add_argument("--block_k", type=int, default=0, help="0: the kernel's own")
    ap.add_argument("--skip_padding", action="store_true", help="also each blockwise variant with skip_padding")
    ap.add_argument("--only", choices=["blockwise"], help="measure the blockwise variant(s) alone")
    ap.add_argument("--gin", action="append", default=[])
    args = ap.parse_args(argv)
    import jax

    from hnet import sharding

    variants = {} if args.only else {"dense": (lambda: attention_kernel("dense"), [])}
    tiles = lambda bq: dict(block_q=bq or None, block_k=args.block_k or None)  # noqa: E731
    for bq in args.block_q:
        variants[f"blockwise bq={bq or 'auto'}"] = (lambda bq=bq: attention_kernel("blockwise", **tiles(bq)), [])
        if args.skip_padding:
            variants[f"blockwise bq={bq or 'auto'} skip_padding"] = (
                lambda bq=bq: attention_kernel("blockwise", **tiles(bq), skip_padding=True), [])
    for v in args.variant:
        name, binding = v.split("=", 1)
        variants[name] = (lambda: attention_kernel("dense"), [binding])
    steps = {}
    for name, (ctx, bindings) in variants.items():
        with ctx():
            compiled, state, next_batch, _, compile_s, batch, mesh, _ = throughput.compiled_step(
                args.config, args.seq_len, args.bytes_per_step, args.gin + bindings)
        steps[name] = dict(compiled=compiled, state=state, next_batch=next_batch, compile_s=compile_s, times=[])
    result = {"config": args.config, "seq_len": args.seq_len, "batch": batch, "load_before": os.getloadavg()}
    with sharding.mesh_context(mesh):
        for r in range(args.rounds + 1):  # round 0 is the warm-up
            for name, s in steps.items():
                t0 = time.perf_counter()
                s["state"], m = s["compiled"](s["state"], s["next_batch"]())
                loss = float(jax.block_until_ready(m["loss"]))
                if r:
                    s["times"].append(time.perf_counter() - t0)
                s["loss"] = loss
    result["load_after"] = os.getloadavg()
    result["peak_rss_mb"] = throughput.peak_rss_mb()
    result["variants"] = {n: dict(compile_s=s["compile_s"], step_times_s=s["times"], loss=s["loss"],
                                  step_s=statistics.median(s["times"])) for n, s in steps.items()}
    if "dense" in steps:
        d = steps["dense"]["times"]
        result["speedup_per_round"] = {n: [a / b for a, b in zip(d, s["times"])] for n, s in steps.items()
                                       if n != "dense"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # time the runtime the CLIs use (train/malloc.py)
    main()
