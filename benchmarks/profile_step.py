"""Where one compiled train step spends its time on XLA:CPU, per HLO op, attributed to our source.

    .venv/bin/python benchmarks/profile_step.py --config isotropic_tiny --seq_len 1024 --steps 2

Method: ``jax.profiler`` traces ``--steps`` steps after a warm-up step (perfetto JSON); XLA:CPU's thunk
executor records one event per executed HLO instruction (``args.hlo_op``); a while loop's or conditional's
event spans the events of the ops in its body, so those are dropped (counted, they doubled the time of the
attention kernel's loops). Each instruction of the optimized HLO (``compiled.as_text()``) carries the Python
stack that produced it (backward ops point at their forward code), so an op's time goes to (innermost
function of ours on its stack, op kind), where the kind is ``matmul`` (a dot, or a fusion containing one),
``gather``/``scatter``, ``copy/transpose`` (layout only) or ``elementwise`` (other fusions, reductions).
Thunk times are summed over threads (two threads can run ops concurrently), so shares are of the summed op
time; the wall time of the traced steps is printed too.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab_step  # noqa: E402  (same directory)
import throughput  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^=]*\{\s*$")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
CONTROL_FLOW_OPS = {"while", "conditional", "call"}
LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate", "pad",
              "dynamic-slice", "dynamic-update-slice", "copy-start", "copy-done"}


def parse_hlo(text: str) -> tuple[dict, dict, dict]:
    """({instruction: (opcode, stack frame id, called computation)}, {computation: set of opcodes},
    {stack frame id: label}) from optimized HLO text with its stack-frame tables."""
    instrs, comps, comp = {}, collections.defaultdict(set), None
    tables, table = collections.defaultdict(dict), None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = line
            continue
        m = _TABLE_ROW.match(line)
        if table and m:
            tables[table][int(m.group(1))] = m.group(2)
            continue
        table = None
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
            continue
        m = _INSTR.match(_COMMENT.sub("", line))  # a tuple type's /*index=5*/ would stop the match
        if not m:
            continue
        name, op = m.groups()
        comps[comp].add(op)
        frame, calls = _FRAME.search(line), _CALLS.search(line)
        instrs[name] = (op, int(frame.group(1)) if frame else None, calls.group(1) if calls else None)
    return instrs, comps, frame_labels(tables)


# our thin wrappers of library layers: their ops go to the caller (SwiGLU, Attention.qkv, ...), not to them
WRAPPERS = {("hnet/layers.py", "Linear.__call__")}


def frame_labels(tables: dict) -> dict[int, str]:
    """{frame id: 'repo/file.py:function'} of the innermost frame in this repository (``WRAPPERS`` skipped),
    plus the innermost frame's function in brackets when that lies in a library (``Linear.__call__``,
    optax's Adam)."""
    field = lambda s, k: int(re.search(rf"{k}=(\d+)", s).group(1))  # noqa: E731
    files = {i: s.strip('"') for i, s in tables["FileNames"].items()}
    funcs = {i: s.strip('"') for i, s in tables["FunctionNames"].items()}
    locs = {i: (files[field(s, "file_name_id")], funcs[field(s, "function_name_id")])
            for i, s in tables["FileLocations"].items()}
    # the printed parent id is one more than the parent's own id (1 = no parent)
    frames = {i: (locs[field(s, "file_location_id")], field(s, "parent_frame_id") - 1)
              for i, s in tables["StackFrames"].items()}
    labels = {}
    for i in frames:
        chain, j = [], i
        while j in frames and len(chain) < 64:
            chain.append(frames[j][0])
            j = frames[j][1]
        ours = [(f, fn) for f, fn in chain if f.startswith(throughput.ROOT) and "site-packages" not in f
                and (os.path.relpath(f, throughput.ROOT), fn) not in WRAPPERS]
        label = f"{os.path.relpath(ours[0][0], throughput.ROOT)}:{ours[0][1]}" if ours else "?"
        if chain and "site-packages" in chain[0][0]:
            label += f" [{chain[0][1]}]"
        labels[i] = label
    return labels


def kind(op: str, called_ops: set) -> str:
    ops = called_ops | {op}
    if ops & {"dot", "convolution"} or "ynn" in op:
        return "matmul"
    if ops & {"gather", "scatter"}:
        return "gather/scatter"
    if ops - {"parameter", "constant", "tuple", "get-tuple-element"} <= LAYOUT_OPS:
        return "copy/transpose"
    return "elementwise"


def op_times(trace_dir: str) -> dict[str, float]:
    """{hlo_op: summed microseconds} over the perfetto trace in ``trace_dir``."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    t = collections.Counter()
    for e in json.load(gzip.open(path))["traceEvents"]:
        op = e.get("args", {}).get("hlo_op")
        if e.get("ph") == "X" and op and e.get("args", {}).get("hlo_module", "").startswith("jit_"):
            t[op] += e.get("dur", 0.0)
    return t


def without_control_flow(times: dict[str, float], instrs: dict) -> dict[str, float]:
    """``times`` less the while / conditional / call instructions: their events span the ops of their bodies,
    which the trace records separately (counting both doubled the loops' time)."""
    return {op: us for op, us in times.items() if instrs.get(op, (op,))[0] not in CONTROL_FLOW_OPS}


def profile(config: str, seq_len: int, bytes_per_step: int, steps: int, bindings: list[str],
            blockwise: bool = False, init_from: str | None = None) -> dict:
    import jax

    from hnet import sharding

    with ab_step.attention_kernel("blockwise") if blockwise else ab_step.attention_kernel("dense"):
        compiled, state, next_batch, _, _, batch, mesh, _ = throughput.compiled_step(config, seq_len, bytes_per_step,
                                                                                   bindings, init_from)
    instrs, comps, labels = parse_hlo(compiled.as_text())
    with sharding.mesh_context(mesh), tempfile.TemporaryDirectory() as d:
        box = {"state": state}

        def one_step():
            box["state"], m = compiled(box["state"], next_batch())
            jax.block_until_ready(m["loss"])

        one_step()
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        times = without_control_flow(op_times(d), instrs)
    rows = collections.Counter()
    for op, us in times.items():
        opcode, frame, calls = instrs.get(op, (op, None, None))
        rows[(labels.get(frame, "?"), kind(opcode, comps.get(calls, set())))] += us / steps / 1e3
    return {"config": config, "seq_len": seq_len, "batch": batch, "wall_ms": wall * 1e3,
            "op_ms": sum(rows.values()), "rows": [[w, k, ms] for (w, k), ms in rows.most_common()]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="isotropic_tiny")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--bytes_per_step", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2, help="traced steps (after one warm-up step)")
    ap.add_argument("--gin", action="append", default=[])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--blockwise", action="store_true", help="with the blockwise attention kernel")
    ap.add_argument("--init_from", help="workdir of a run of the same config: profile its latest train state")
    ap.add_argument("--out", help="JSON of the rows")
    args = ap.parse_args(argv)
    r = profile(args.config, args.seq_len, args.bytes_per_step, args.steps, args.gin, args.blockwise, args.init_from)
    print(f"{r['config']} L={r['seq_len']} B={r['batch']}: wall {r['wall_ms']:.0f} ms/step, "
          f"summed op time {r['op_ms']:.0f} ms/step")
    print("| source (function) | op kind | ms/step | share |\n|---|---|---|---|")
    for w, k, ms in r["rows"][:args.top]:
        print(f"| {w} | {k} | {ms:.0f} | {100 * ms / r['op_ms']:.1f} % |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # time the runtime the CLIs use (train/malloc.py)
    main()
