"""Training throughput benchmark: bytes/s, step time, compile time, FLOPs per byte and peak memory of
model configs at several sequence lengths (one subprocess per measurement, so peak RSS is its own).

    .venv/bin/python benchmarks/throughput.py --configs isotropic_tiny hnet_1stage_tiny \
        --seq_lens 1024 4096 --bytes_per_step 8192 --out benchmarks/out/throughput.json

FLOPs are XLA's own count for the compiled train step (forward + backward + update), divided by
the bytes in the step: what the hardware actually executes, including H-Net's static chunk capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config: str, seq_len: int, bytes_per_step: int, steps: int, bindings: list[str]) -> dict:
    """Runs in the child process."""
    import resource

    import jax
    import numpy as np

    from hnet import sharding
    from train import config as cfg_lib
    from train import data as data_lib
    from train.loop import build_state
    from train.optim import OptimizerConfig
    from train.step import make_train_step

    cfg_lib.parse([os.path.join(ROOT, "configs", f"{config}.gin"), os.path.join(ROOT, "configs/runs/default.gin")],
                  bindings)
    import gin

    model_fn = gin.query_parameter("train.train.model").scoped_configurable_fn
    batch = max(1, bytes_per_step // seq_len)
    docs, _ = data_lib.load_documents(data_lib.DataConfig())
    it = data_lib.make_train_iterator(data_lib.DataConfig(seq_len=seq_len, batch_size=batch), docs)
    mesh = sharding.make_mesh()
    setup = build_state(model_fn, OptimizerConfig(), 1000, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state.params))
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.schedule),
                   in_shardings=(setup.state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
    with sharding.mesh_context(mesh):
        b = sharding.global_batch_from_local(mesh, next(it))
        t0 = time.time()
        compiled = step.lower(setup.state, b).compile()
        compile_s = time.time() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        state = setup.state
        state, m = compiled(state, b)
        jax.block_until_ready(m["loss"])
        times = []
        for _ in range(steps):
            b = sharding.global_batch_from_local(mesh, next(it))
            t0 = time.time()
            state, m = compiled(state, b)
            jax.block_until_ready(m["loss"])
            times.append(time.time() - t0)
    step_s = float(np.median(times))
    return {"config": config, "seq_len": seq_len, "batch": batch, "params": n_params,
            "compile_s": compile_s, "step_s": step_s, "bytes_per_s": batch * seq_len / step_s,
            "flops_per_byte": float(cost.get("flops", float("nan"))) / (batch * seq_len),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": float(m["loss"]), "bindings": bindings}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["isotropic_tiny", "hnet_1stage_tiny"])
    ap.add_argument("--seq_lens", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--bytes_per_step", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gin", action="append", default=[], help="extra binding for every config")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/out/throughput.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        config, L = args.child.split("@")
        print("RESULT " + json.dumps(measure(config, int(L), args.bytes_per_step, args.steps, args.gin)))
        return
    rows = []
    for config in args.configs:
        for L in args.seq_lens:
            cmd = [sys.executable, __file__, "--child", f"{config}@{L}", "--bytes_per_step", str(args.bytes_per_step),
                   "--steps", str(args.steps)] + [f"--gin={g}" for g in args.gin]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=ROOT))
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{config} L={L} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[0][len("RESULT "):]))
            r = rows[-1]
            print(f"{config:28s} L={L:5d} B={r['batch']:3d} params={r['params']/1e6:6.2f}M "
                  f"GFLOP/byte={r['flops_per_byte']/1e9:7.4f} compile={r['compile_s']:5.1f}s "
                  f"step={r['step_s']*1e3:8.1f}ms bytes/s={r['bytes_per_s']:9.0f} rss={r['peak_rss_mb']:6.0f}MB",
                  flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "cpu_count": os.cpu_count(), "time": time.ctime()}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
