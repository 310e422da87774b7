"""Training throughput benchmark: bytes/s, step time, compile time, FLOPs per byte and peak memory of
model configs at several sequence lengths (one subprocess per measurement, so peak RSS is its own).

    # every model family (configs/*_tiny.gin) at L = 1024 and 4096
    .venv/bin/python benchmarks/throughput.py --steps 3 --out docs/throughput_families_cpu.json
    # length scaling 1k -> 8k at a fixed 8192 bytes per step (B = 8, 4, 2, 1)
    .venv/bin/python benchmarks/throughput.py --scaling --configs isotropic_tiny hnet_1stage_tiny
    # --resume keeps the rows already in --out (written after every measurement) and measures the rest
    # the families at matched FLOPs per byte: configs and per-model bindings of a sweep file
    .venv/bin/python benchmarks/throughput.py --models_from configs/sweeps/matched_models.gin
    # in the trained regime: the train state (params, optimizer) of a run of the same config, e.g. H-Net
    # with its learned ~6 bytes per chunk instead of the ~2 of a fresh router (static shapes are the same)
    .venv/bin/python benchmarks/throughput.py --configs hnet_1stage_tiny --init_from runs/default

Each config is trained on its run's data pipeline (configs/runs/default.gin), with the per-byte
annotations each model declares (HAT/LYT word starts, MAGNET script routes); a config whose data needs
cannot be met there (magnet_lang_tiny: language-named NTREX files) is skipped with the data error. FLOPs are XLA's own count for the
compiled train step (forward + backward + update) divided by the bytes in the step: what the hardware
actually executes, including static chunk capacities. Every row records os.getloadavg() before and after
its subprocess: on a shared machine, compare rows measured under similar load.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = sorted(os.path.basename(p)[:-len(".gin")] for p in glob.glob(os.path.join(ROOT, "configs", "*_tiny.gin")))
SCALING_LENS = [1024, 2048, 4096, 8192]


def timed(fn, steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` calls of ``fn()``; fn must block until its work is done."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sweep_models(path: str) -> dict[str, list[str]]:
    """{config name: its bindings} from a sweep file's ``sweep.Sweep.models`` / ``model_bindings``."""
    import gin

    from train.sweep import Sweep

    gin.clear_config()
    gin.parse_config_file(path)
    sw = Sweep(name=os.path.basename(path))  # the file may be a fragment without a sweep name
    return {os.path.splitext(os.path.basename(m))[0]: list(sw.model_bindings.get(m, ())) for m in sw.models}


def compiled_step(config: str, seq_len: int, bytes_per_step: int, bindings: list[str], init_from: str | None = None):
    """Builds ``config``'s train step at ``seq_len`` on its run's data pipeline (B = bytes_per_step // L),
    from a fresh state or the latest checkpoint of the workdir ``init_from`` (a run of the same config).

    Returns (compiled step, state, next_batch(), n_params, compile seconds, batch size, mesh,
    flops_per_byte()): the last counts the step's FLOPs per byte when called (``train.step.flops_per_byte``:
    one more trace, on the next batch)."""
    import gin
    import jax
    import numpy as np

    from hnet import sharding
    from train import config as cfg_lib
    from train import data as data_lib
    from train.loop import build_state, jit_train_step
    from train.optim import OptimizerConfig
    from train.step import flops_per_byte, make_train_step

    cfg_lib.parse([os.path.join(ROOT, "configs", f"{config}.gin"), os.path.join(ROOT, "configs/runs/default.gin")],
                  bindings)
    model_fn = gin.query_parameter("train.train.model").scoped_configurable_fn
    batch = max(1, bytes_per_step // seq_len)
    data_cfg = gin.query_parameter("train.train.train_data").scoped_configurable_fn()
    data_cfg = dataclasses.replace(data_cfg, seq_len=seq_len, batch_size=batch)
    mesh = sharding.make_mesh()
    setup = build_state(model_fn, OptimizerConfig(), 1000, mesh)
    if init_from:
        from train.restore import checkpointer

        ckpt = checkpointer(init_from)
        with sharding.mesh_context(mesh):
            setup.state = ckpt.restore(ckpt.all_steps()[-1], setup.state)
    data_cfg = setup.data_config(data_cfg)  # the annotations the model reads
    docs, _ = data_lib.load_documents(data_cfg)
    it = data_lib.make_train_iterator(data_cfg, docs)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state.params))
    step = jit_train_step(setup)

    def next_batch():
        return sharding.global_batch_from_local(mesh, next(it))

    with sharding.mesh_context(mesh):
        t0 = time.perf_counter()
        compiled = step.lower(setup.state, next_batch()).compile()
        compile_s = time.perf_counter() - t0

    def count_flops():
        with sharding.mesh_context(mesh):
            return flops_per_byte(make_train_step(setup.graphdef, setup.tx, setup.schedule), setup.state,
                                  next_batch(), batch * seq_len)

    return compiled, setup.state, next_batch, n_params, compile_s, batch, mesh, count_flops


def measure(config: str, seq_len: int, bytes_per_step: int, steps: int, bindings: list[str],
            init_from: str | None = None) -> dict:
    """Runs in the child process: compile, one warm-up step, then ``steps`` timed steps (median)."""
    import jax
    import numpy as np

    from hnet import sharding

    compiled, state, next_batch, n_params, compile_s, batch, mesh, count_flops = compiled_step(
        config, seq_len, bytes_per_step, bindings, init_from)
    flops = count_flops()  # before the steps: they donate the state it traces with
    with sharding.mesh_context(mesh):
        box = {"state": state}

        def one_step():
            box["state"], box["m"] = compiled(box["state"], next_batch())
            jax.block_until_ready(box["m"]["loss"])

        one_step()  # warm-up
        times = timed(one_step, steps)
    step_s = float(np.median(times))
    return {"config": config, "seq_len": seq_len, "batch": batch, "params": n_params,
            "compile_s": compile_s, "step_s": step_s, "step_times_s": times, "bytes_per_s": batch * seq_len / step_s,
            "flops_per_byte": flops,
            "peak_rss_mb": peak_rss_mb(), "loss": float(box["m"]["loss"]), "bindings": bindings, "init_from": init_from,
            "bytes_per_chunk": {k: float(v) for k, v in box["m"].items() if k.startswith("bytes_per_chunk")},
            "threads": len(os.sched_getaffinity(0)), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def run_child(script: str, args: list[str], timeout: float = 1800, env: dict[str, str] | None = None) -> dict | None:
    """Runs ``script args`` in a fresh Python (environment: ours, updated with ``env``) and returns the dict it
    printed as ``RESULT {json}`` (None on failure, with its stderr tail), plus the load average just before and
    after."""
    load_before = os.getloadavg()
    try:
        p = subprocess.run([sys.executable, script] + args, capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})), timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{os.path.basename(script)} {' '.join(args)}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        print(f"{os.path.basename(script)} {' '.join(args)} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return dict(json.loads(line[-1][len("RESULT "):]), load_before=load_before, load_after=os.getloadavg())


def measure_in_subprocess(config: str, seq_len: int, bytes_per_step: int, steps: int,
                          bindings: list[str] = (), init_from: str | None = None) -> dict | None:
    args = ["--child", f"{config}@{seq_len}", "--bytes_per_step", str(bytes_per_step), "--steps", str(steps)]
    args += ["--init_from", os.path.abspath(init_from)] if init_from else []
    return run_child(os.path.abspath(__file__), args + [f"--gin={g}" for g in bindings])


def load_str(r: dict) -> str:
    """1-minute load average before -> after the measurement."""
    return f"{r['load_before'][0]:.1f}→{r['load_after'][0]:.1f}"


def markdown_table(rows: list[dict]) -> str:
    out = ["| config | L | B | params | GFLOP/byte | compile (s) | step (ms) | bytes/s | peak RSS (MB) | load 1 min |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['seq_len']} | {r['batch']} | {r['params'] / 1e6:.2f}M | "
                   f"{r['flops_per_byte'] / 1e9:.4f} | {r['compile_s']:.1f} | {r['step_s'] * 1e3:.0f} | "
                   f"{r['bytes_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {load_str(r)} |")
    return "\n".join(out)


def scaling_table(rows: list[dict]) -> str:
    """bytes/s per config (rows) and sequence length (columns), plus longest / shortest."""
    lens = sorted({r["seq_len"] for r in rows})
    by = {(r["config"], r["seq_len"]): r["bytes_per_s"] for r in rows}
    out = ["| config | " + " | ".join(f"L={L}" for L in lens) + f" | {lens[-1]}/{lens[0]} |",
           "|---" * (len(lens) + 2) + "|"]
    for c in dict.fromkeys(r["config"] for r in rows):
        v = [by.get((c, L)) for L in lens]
        ratio = f"{v[-1] / v[0]:.2f}" if v[0] and v[-1] else "—"
        out.append(f"| {c} | " + " | ".join(f"{x:.0f}" if x else "—" for x in v) + f" | {ratio} |")
    return "\n".join(out)


def previous_rows(path: str, resume: bool) -> list[dict]:
    """The rows already in ``path`` when resuming (measurements are then skipped), else []."""
    if not (resume and os.path.exists(path)):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def write_json(path: str, rows: list[dict], **meta) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows, "command": " ".join(sys.argv), "cpu_count": os.cpu_count(),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **meta}, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=FAMILIES, help="config names (default: every family)")
    ap.add_argument("--seq_lens", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--scaling", action="store_true", help=f"length scaling: --seq_lens {SCALING_LENS}")
    ap.add_argument("--bytes_per_step", type=int, default=8192, help="batch = bytes_per_step // L")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    ap.add_argument("--gin", action="append", default=[], help="extra binding for every config")
    ap.add_argument("--models_from", help="sweep .gin file: its models and model_bindings replace --configs")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/out/throughput.json"),
                    help="JSON, rewritten after every measurement")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    ap.add_argument("--init_from", help="workdir of a run of the same config: time its latest train state")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from train.data import DataError

        config, L = args.child.split("@")
        try:
            r = measure(config, int(L), args.bytes_per_step, args.steps, args.gin, args.init_from)
        except DataError as e:  # the run's data cannot feed this model: skipped, not a failure
            r = {"skipped": str(e)}
        print("RESULT " + json.dumps(r))
        return
    seq_lens = SCALING_LENS if args.scaling else args.seq_lens
    configs = sweep_models(args.models_from) if args.models_from else {c: [] for c in args.configs}
    rows = previous_rows(args.out, args.resume)
    for config, own in configs.items():
        for L in seq_lens:
            if any((r["config"], r["seq_len"]) == (config, L) for r in rows):
                continue
            r = measure_in_subprocess(config, L, args.bytes_per_step, args.steps, own + args.gin, args.init_from)
            if r is not None and "skipped" in r:
                print(f"{config}: skipped, {r['skipped']}", flush=True)
                break
            if r is None:
                continue
            rows.append(r)
            write_json(args.out, rows, bytes_per_step=args.bytes_per_step, steps=args.steps)
            print(f"{config:28s} L={L:5d} B={r['batch']:3d} params={r['params'] / 1e6:6.2f}M "
                  f"GFLOP/byte={r['flops_per_byte'] / 1e9:7.4f} compile={r['compile_s']:5.1f}s "
                  f"step={r['step_s'] * 1e3:8.1f}ms bytes/s={r['bytes_per_s']:9.0f} rss={r['peak_rss_mb']:6.0f}MB "
                  f"load={load_str(r)}", flush=True)
    if rows:
        print("\n" + markdown_table(rows))
        if len(seq_lens) > 1:
            print("\nbytes/s by sequence length\n\n" + scaling_table(rows))


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # time the runtime the CLIs use (train/malloc.py)
    main()
