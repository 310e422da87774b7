"""Ahead-of-time compile of a config's train and eval steps for a real TPU topology, on this (CPU) host.

    python -m launch.aot --gin_file=configs/hnet_1stage_XL.gin --gin_file=configs/runs/pretrain_8k.gin \\
        [--gin.KEY=value ...] --topology=v5p:4x4x4 [--num_slices=2] [--mesh=fsdp=-1] [--json=OUT.json]

With libtpu installed (``pip install "jax[tpu]==0.10.2"``), ``get_topology_desc`` describes the chips
of a slice without any attached, and ``jit(...).lower(abstract args).compile()`` runs the real TPU
compiler (Mosaic included, so Pallas kernels are compiled, not interpreted). The step is the project's
own ``build_state`` / ``make_train_step`` / ``make_eval_step``, lowered with ``jax.ShapeDtypeStruct``
arguments that carry their shardings: nothing is allocated (MaxText's ``train_compile.py`` does the same).

Prints a report and (``--json``) writes: chips, hbm_bytes_per_chip, state_bytes_per_chip,
temp_bytes_per_chip, total_bytes_per_chip, fits, headroom, flops_per_chip, bytes_accessed_per_chip (XLA's counts
of the compiled step, which miss the Mosaic kernels' work), model_flops_per_chip (``train.step.flops_per_byte``'s
count, which includes it), collectives (count by kind), pallas_kernels (Mosaic custom calls), roofline_step_s,
mfu_bound, compile_s
and the same memory figures for the eval step under ``eval``.

Exit status: 0 fits, 3 does not fit (HBM exhausted at compile time, or more bytes than the chip has),
2 configuration error (bad gin, unknown topology, mesh that does not divide the chips).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin files, composed in order (as train.main)")
flags.DEFINE_multi_string("gin_bindings", [], "extra bindings (same as --gin.KEY=value)")
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8")
flags.DEFINE_integer("num_slices", 1, "number of slices (multislice over DCN; slices split the 'data' axis)")
flags.DEFINE_string("mesh", None, "AXIS=N[,AXIS=N] over data/fsdp/tensor, one N may be -1 "
                                  "(default: train.train.mesh_shape, else data=-1)")
flags.DEFINE_string("json", None, "write the report as JSON here")
flags.DEFINE_bool("eval", True, "also compile the eval step")

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: int  # HBM capacity per chip
    hbm_bytes_per_s: float  # HBM bandwidth per chip
    source: str


# Keyed by ``device.device_kind``. Figures from the Cloud TPU system-architecture pages (per chip):
CHIPS = {
    "TPU v4": Chip(275e12, 32 * GiB, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip(197e12, 16 * GiB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip(459e12, 95 * GiB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip(918e12, 32 * GiB, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_MOSAIC_RE = re.compile(r'%([\w-]+?)(?:\.\d+)? = [^\n]*custom_call_target="tpu_custom_call"')


class ConfigError(ValueError):
    pass


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """'fsdp=-1,tensor=2' -> {'fsdp': -1, 'tensor': 2}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise ConfigError(f"--mesh wants AXIS=N[,AXIS=N], got {text!r}") from None
        if not sep:
            raise ConfigError(f"--mesh wants AXIS=N[,AXIS=N], got {text!r}")
    return out


def topology_devices(name: str, num_slices: int = 1):
    from jax.experimental import topologies

    try:
        kw = {"num_slices": num_slices} if num_slices > 1 else {}
        if name.startswith("v4"):
            kw["chip_config_name"] = "megacore"  # one device per chip (its two TensorCores), as on v4 VMs
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kw).devices)
    except Exception as e:  # noqa: BLE001 - libtpu raises assorted errors for unknown names
        raise ConfigError(f"cannot describe TPU topology {name!r} (is libtpu installed?): {e}") from None


def make_mesh(shape: dict[str, int], devices, num_slices: int = 1):
    """The training mesh over ``devices``; with several slices, 'data' spans them (DCN) first."""
    from hnet import sharding

    try:
        if num_slices == 1:
            return sharding.make_mesh(shape, devices=devices)
        import jax
        from jax.experimental import mesh_utils

        sizes = sharding.resolve_mesh_shape(shape, len(devices))
        if sizes[0] % num_slices:
            raise ValueError(f"mesh {dict(zip(sharding.MESH_AXES, sizes))}: 'data' must be a multiple of "
                             f"{num_slices} slices")
        ici = (sizes[0] // num_slices, *sizes[1:])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
        return jax.sharding.Mesh(grid, sharding.MESH_AXES,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def abstract_batch(cfg, mesh):
    """ShapeDtypeStructs of one global batch of ``cfg`` (a train.DataConfig), sharded like train.loop's."""
    import jax
    import numpy as np

    from hnet import sharding
    from train import annotations
    from train import data as data_lib

    extra = {n: np.zeros(0, annotations.ANNOTATIONS[n][1]) for n in cfg.annotations}
    return {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), v.dtype, sharding=sharding.batch_sharding(mesh))
            for k, v in data_lib.empty_window(cfg.seq_len, extra).items()}


def shard_bytes(tree) -> int:
    """Bytes of one device's shards of an abstract (sharded) pytree."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def analyse(compiled) -> dict:
    """Per-chip memory, cost, collectives and Mosaic kernels of a compiled executable."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    hlo = compiled.as_text()
    coll = {k: 0 for k in COLLECTIVES}
    for m in _COLLECTIVE_RE.finditer(hlo):
        coll[m.group(1)] += 1
    return {
        "argument_bytes_per_chip": int(mem.argument_size_in_bytes),
        "output_bytes_per_chip": int(mem.output_size_in_bytes),
        "alias_bytes_per_chip": int(mem.alias_size_in_bytes),
        "temp_bytes_per_chip": int(mem.temp_size_in_bytes),
        "code_bytes_per_chip": int(mem.generated_code_size_in_bytes),
        "total_bytes_per_chip": int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                    + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes),
        "flops_per_chip": float(cost.get("flops", float("nan"))),
        "bytes_accessed_per_chip": float(cost.get("bytes accessed", float("nan"))),
        "collectives": coll,
        "pallas_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
        "pallas_kernel_names": dict(collections.Counter(_MOSAIC_RE.findall(hlo))),
    }


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> tuple[float, float]:
    """(step seconds bound = max(compute time, HBM time), MFU bound = compute time / that bound).

    From XLA's per-chip counts; they include rematerialised FLOPs, so the MFU bound is a hardware-FLOP
    utilisation bound. Communication time is not modelled."""
    t_compute, t_mem = flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_s
    t = max(t_compute, t_mem)
    return t, (t_compute / t if t > 0 else float("nan"))


def is_out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e)


def compile_and_analyse(jitted, args, mesh, chip: Chip) -> dict:
    """Lower and compile ``jitted(*args)`` under ``mesh``: ``analyse``'s report with ``compile_s`` and ``fits``
    (total bytes within the chip's HBM), or {fits: False, error, compile_s} when the compiler runs out of HBM."""
    from hnet import sharding

    t0 = time.time()
    with sharding.mesh_context(mesh):
        try:
            compiled = jitted.lower(*args).compile()
        except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError
            if not is_out_of_memory(e):
                raise
            return {"fits": False, "error": str(e).splitlines()[0][:500], "compile_s": time.time() - t0}
    report = dict(analyse(compiled), compile_s=time.time() - t0)
    report["fits"] = report["total_bytes_per_chip"] <= chip.hbm_bytes
    return report


def model_flops(setup, batch, n_bytes: int) -> float:
    """FLOPs of one train step as ``train.step.flops_per_byte`` counts them (the reference program: Mosaic
    kernels' work included, rematerialisation not), lowered on one CPU device: the cost analysis of a program
    lowered for a TPU topology reports no FLOPs, and the count does not depend on the placement."""
    import jax

    from hnet import sharding
    from train.step import flops_per_byte, make_train_step

    unplaced = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    with sharding.mesh_context(sharding.make_mesh(devices=jax.devices("cpu")[:1])):
        return n_bytes * flops_per_byte(make_train_step(setup.graphdef, setup.tx, setup.schedule),
                                        unplaced(setup.state), unplaced(batch), n_bytes)


def compile_for(topology: str, num_slices: int = 1, mesh_shape: dict | None = None, eval_step: bool = True) -> dict:
    """Compile the gin-configured run (already parsed) for ``topology``; returns the report dict."""
    import gin
    import jax

    from hnet import sharding
    from train.loop import build_state, jit_train_step
    from train.step import make_eval_step

    b = gin.get_bindings("train.train")
    if "model" not in b or "train_data" not in b:
        raise ConfigError("the gin files must bind train.train.model and train.train.train_data")
    from train.loop import OptimizerConfig  # the gin-registered one

    devices = topology_devices(topology, num_slices)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ConfigError(f"no chip figures for {kind!r}; known: {', '.join(CHIPS)}")
    chip = CHIPS[kind]
    shape = mesh_shape or b.get("mesh_shape") or {"data": -1}
    mesh = make_mesh(shape, devices, num_slices)
    train_cfg, steps = b["train_data"], int(b.get("steps", 1))
    accum = int(b.get("grad_accum_steps", 1))
    if train_cfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"] * accum):
        raise ConfigError(f"global batch {train_cfg.batch_size} does not split into {accum} micro-batches over "
                          f"data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']} devices")
    report = {"topology": topology, "num_slices": num_slices, "device_kind": kind, "chips": len(devices),
              "mesh": dict(mesh.shape), "batch_size": train_cfg.batch_size, "seq_len": train_cfg.seq_len,
              "grad_accum_steps": accum, "hbm_bytes_per_chip": chip.hbm_bytes, "chip_source": chip.source}
    setup = build_state(b["model"], b.get("optimizer", OptimizerConfig()), steps, mesh, allocate=False)
    report["param_count"] = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.state.params))
    report["state_bytes_per_chip"] = shard_bytes(setup.state)
    report["params_bytes_per_chip"] = shard_bytes(setup.state.params)
    report["opt_state_bytes_per_chip"] = shard_bytes(setup.state.opt_state)
    step = jit_train_step(setup, grad_accum_steps=accum)
    batch = abstract_batch(setup.data_config(train_cfg), mesh)
    report.update(compile_and_analyse(step, (setup.state, batch), mesh, chip))
    if "error" in report:
        return report
    report["headroom"] = 1.0 - report["total_bytes_per_chip"] / chip.hbm_bytes
    report["roofline_step_s"], report["mfu_bound"] = roofline(report["flops_per_chip"],
                                                              report["bytes_accessed_per_chip"], chip)
    report["bytes_per_step"] = train_cfg.batch_size * train_cfg.seq_len
    report["model_flops_per_chip"] = model_flops(setup, batch, report["bytes_per_step"]) / len(devices)
    if eval_step:
        eval_cfg = b.get("eval_data") or train_cfg
        params_sh, rest_sh = setup.state_shardings.params, setup.state_shardings.rest
        ev = jax.jit(make_eval_step(setup.graphdef), in_shardings=(params_sh, rest_sh, sharding.batch_sharding(mesh)))
        report["eval"] = compile_and_analyse(ev, (setup.state.params, setup.state.rest,
                                                  abstract_batch(eval_cfg, mesh)), mesh, chip)
        report["fits"] = report["fits"] and report["eval"]["fits"]
    return report


def format_report(r: dict) -> str:
    g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    lines = [f"{r['topology']} x{r['num_slices']} slice(s): {r['chips']} x {r['device_kind']} "
             f"({g(r['hbm_bytes_per_chip'])} HBM each), mesh {r['mesh']}",
             f"batch {r['batch_size']} x {r['seq_len']} bytes, {r['grad_accum_steps']} micro-batch(es)"]
    if "param_count" in r:
        lines.append(f"parameters {r['param_count']:,}; state per chip {g(r['state_bytes_per_chip'])} "
                     f"(params {g(r['params_bytes_per_chip'])}, optimizer {g(r['opt_state_bytes_per_chip'])})")
    if "error" in r:
        lines.append(f"train step DOES NOT FIT: {r['error']}")
    else:
        lines += [f"train step: temporaries {g(r['temp_bytes_per_chip'])}, total {g(r['total_bytes_per_chip'])} "
                  f"-> {'fits' if r['total_bytes_per_chip'] <= r['hbm_bytes_per_chip'] else 'DOES NOT FIT'}, "
                  f"headroom {100 * r['headroom']:.1f}%",
                  f"  {r['flops_per_chip']:.3e} FLOPs and {r['bytes_accessed_per_chip']:.3e} bytes accessed per chip; "
                  f"roofline step {r['roofline_step_s']:.3f} s, MFU bound {100 * r['mfu_bound']:.1f}%",
                  f"  model FLOPs per chip {r['model_flops_per_chip']:.3e} (the reference program's count: Mosaic "
                  f"kernels' work included, rematerialisation not)",
                  f"  collectives {r['collectives']}; Mosaic kernels {r['pallas_kernels']} "
                  f"{r['pallas_kernel_names']}; compiled in {r['compile_s']:.0f} s"]
    if "eval" in r:
        e = r["eval"]
        lines.append(f"eval step: DOES NOT FIT: {e['error']}" if "error" in e else
                     f"eval step: temporaries {g(e['temp_bytes_per_chip'])}, total {g(e['total_bytes_per_chip'])}, "
                     f"Mosaic kernels {e['pallas_kernels']}; compiled in {e['compile_s']:.0f} s")
    lines.append("FITS" if r["fits"] else "DOES NOT FIT")
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS.gin_file or not FLAGS.topology:
        raise app.UsageError("give --gin_file (at least one) and --topology")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; the TPU devices are compile-only
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's host-detection warnings
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: other libtpu processes may run
    from train import config

    try:
        config.parse(FLAGS.gin_file, list(FLAGS.gin_bindings) + config.GIN_CLI_BINDINGS)
        report = compile_for(FLAGS.topology, FLAGS.num_slices, parse_mesh(FLAGS.mesh), FLAGS.eval)
    except (config.ConfigError, ConfigError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(report))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.exit(0 if report["fits"] else 3)


def run():
    from train.config import run_app

    run_app(main, sys.argv)


if __name__ == "__main__":
    run()
