"""Device check (written for one H200; also runs on CPU with --small): chunk gather kernels, attention kernels.

    (a) correctness: the Pallas gather kernel for this backend (Triton on GPU, Mosaic on TPU,
            Triton in interpret mode on CPU) vs ``jnp.take_along_axis``, f32 and bf16, compaction
            (L -> M) and expansion (M -> L) index patterns; compact/expand gradients impl='pallas'
            vs impl='jnp'.
    (b) timing at B x L x D = 32 x 8192 x 1024 bf16, M = L/4: kernel vs XLA gather, both
            directions, a tile sweep for the kernel, and chunking.compact/expand fwd+bwd.
            Bandwidth counts each gathered row once read and once written:
            bytes = 2 * B * N * D * itemsize + idx bytes (N = M for compaction, L for expansion).
    (c) ``time_hnet_train_step()``: the project's bf16 H-Net train step with chunk_impl 'jnp' vs
            'pallas': step time, compile time, tokens/s and MFU against --peak-tflops.
    (d) attention (``hnet.attention``): every kernel this platform runs (GPU: cudnn and blockwise; CPU:
            blockwise) vs the dense reference, values and gradients, with documents, a causal mask and a
            window; what 'auto' picks for bf16 and fp32; forward + backward time of each at
            B8 L4096 H8 K64 (bf16 and fp32).

Prints a table and writes JSON to --out (default benchmarks/out/device_check.json).

        python benchmarks/device_check.py               # on the GPU machine
        python benchmarks/device_check.py --small       # CPU smoke test (tiny shapes, interpret)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hnet import attention, chunking  # noqa: E402
from hnet.kernels import gather_rows, reference_gather_rows  # noqa: E402
from hnet.kernels.gather_rows import default_backend  # noqa: E402


def _kernel_setup():
    """(kernel backend, interpret flag) for this machine: CPU runs the Triton kernel interpreted."""
    be = default_backend()
    if be == "reference":
        return "gpu", True
    return be, False


def _time(fn, *args, iters: int, warmup: int = 2) -> dict:
    """Median / min wall time (ms) of fn(*args) over ``iters`` blocked calls, after warmup."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t) * 1e3)
    return {"ms_median": statistics.median(ts), "ms_min": min(ts), "first_call_s": compile_s}


def _inputs(B, L, D, M, dtype, seed=0):
    """x [B,L,D], a boundary mask with ~L/4 boundaries (some rows overflow M), and indices."""
    kx, km = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (B, L, D), jnp.float32).astype(dtype)
    mask = jax.random.bernoulli(km, 0.25, (B, L)).at[:, 0].set(True)
    idx_c, _ = jax.jit(chunking.compaction_indices, static_argnums=1)(mask, M)  # [B, M] into L
    idx_e = jnp.clip(chunking.chunk_ids(mask), 0, M - 1)  # [B, L] into M
    return x, mask, idx_c, idx_e


# ----------------------------------------------------------------------------------
# (a) correctness
# ----------------------------------------------------------------------------------


def check_correctness(backend, interpret, small) -> list[dict]:
    B, L, D, M = (2, 64, 32, 16) if small else (4, 1024, 256, 256)
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        x, mask, idx_c, idx_e = _inputs(B, L, D, M, dtype)
        z = x[:, :M]
        for name, src, idx in [("compact L->M", x, idx_c), ("expand M->L", z, idx_e)]:
            row = {"check": f"kernel {name}", "dtype": jnp.dtype(dtype).name, "backend": backend}
            try:
                out = jax.jit(functools.partial(gather_rows, backend=backend, interpret=interpret))(src, idx)
                ref = reference_gather_rows(src, idx)
                row["max_abs_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                row["ok"] = bool(out.dtype == ref.dtype and out.shape == ref.shape and row["max_abs_err"] == 0.0)
            except Exception as e:  # keep going: device time is scarce
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                traceback.print_exc()
            rows.append(row)

    # Gradients through compact -> tanh -> expand, pallas vs jnp.
    x, mask, _, _ = _inputs(B, L, D, M, jnp.float32, seed=1)
    impl = "pallas:" + backend
    row = {"check": "grad compact->tanh->expand", "dtype": "float32", "backend": backend}
    try:
        def loss(x, impl):
            z, _ = chunking.compact(x, mask, M, impl=impl)
            return jnp.sum(jnp.sin(chunking.expand(jnp.tanh(z), mask, impl=impl)) ** 2)

        g1 = jax.jit(jax.grad(functools.partial(loss, impl=impl)))(x)
        g2 = jax.jit(jax.grad(functools.partial(loss, impl="jnp")))(x)
        row["max_abs_err"] = float(jnp.max(jnp.abs(g1 - g2)))
        row["ok"] = row["max_abs_err"] <= 1e-6
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        traceback.print_exc()
    rows.append(row)
    return rows


# ----------------------------------------------------------------------------------
# (b) timing
# ----------------------------------------------------------------------------------


def time_gathers(backend, interpret, small, iters, peak_tbps, tiles) -> list[dict]:
    B, L, D = (2, 64, 32) if small else (32, 8192, 1024)
    M = L // 4
    dtype = jnp.bfloat16
    x, mask, idx_c, idx_e = _inputs(B, L, D, M, dtype)
    z = x[:, :M]
    item = jnp.dtype(dtype).itemsize
    rows = []

    def add(name, impl, fn, args, nbytes, tile=None):
        row = {"op": name, "impl": impl, "tile_rows": tile, "shape": f"B{B} L{L} D{D} M{M} bf16"}
        try:
            row.update(_time(fn, *args, iters=iters))
            row["GB/s"] = nbytes / (row["ms_median"] * 1e-3) / 1e9
            row["frac_peak"] = row["GB/s"] / (peak_tbps * 1e3)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        rows.append(row)

    for name, src, idx in [("gather compact L->M", x, idx_c), ("gather expand M->L", z, idx_e)]:
        n = idx.shape[1]
        nbytes = 2 * B * n * D * item + idx.size * 4
        add(name, "xla take_along_axis", jax.jit(reference_gather_rows), (src, idx), nbytes)
        for t in tiles:
            k = jax.jit(functools.partial(gather_rows, backend=backend, interpret=interpret, tile_rows=t))
            add(name, f"pallas {backend}", k, (src, idx), nbytes, tile=t)

    # Full ops (index maths + gather + zeroing), forward and forward+backward.
    for impl in ("jnp", "pallas:" + backend):
        cfwd = jax.jit(lambda x, m, impl=impl: chunking.compact(x, m, M, impl=impl)[0])
        add("chunking.compact fwd", impl, cfwd, (x, mask), 2 * B * M * D * item)
        efwd = jax.jit(lambda z, m, impl=impl: chunking.expand(z, m, impl=impl))
        add("chunking.expand fwd", impl, efwd, (z, mask), 2 * B * L * D * item)

        def both(x, m, impl=impl):
            def f(x):
                y = chunking.expand(chunking.compact(x, m, M, impl=impl)[0], m, impl=impl)
                return jnp.sum(y, dtype=jnp.float32)

            return jax.grad(f)(x)

        # fwd (2 gathers) + bwd (2 gathers, f32 cumsum): bytes of the four gathers only.
        add("compact+expand fwd+bwd", impl, jax.jit(both), (x, mask),
                2 * (2 * B * M * D * item + 2 * B * L * D * item))
    return rows


# ----------------------------------------------------------------------------------
# (c) HOOK: H-Net train step timing (fill in / adjust once models.hnet settles).
# ----------------------------------------------------------------------------------


def time_hnet_train_step(small: bool, iters: int, peak_tflops: float) -> list[dict]:
    """The project's own bf16 H-Net train step (``benchmarks/throughput.measure``: gin config, data pipeline,
    ``train.step.make_train_step`` with AdamW, donation), chunk_impl 'jnp' vs 'pallas'. MFU = XLA's FLOP
    count of the compiled step / step time / ``peak_tflops``. Small: hnet_1stage_tiny at B2 L64; full: the
    tiny layout widened to d (512, 768), d_ff 2048, heads (8, 12) at B16 L4096."""
    import throughput

    B, L = (2, 64) if small else (16, 4096)
    widths = [] if small else ["models.HNetConfig.d_model=[512, 768]", "models.HNetConfig.d_ff=[0, 2048]",
                               "models.HNetConfig.num_heads=[8, 12]"]
    rows = []
    for impl in ("jnp", "pallas"):
        row = {"op": "hnet train step", "impl": impl, "shape": f"B{B} L{L} bf16"}
        try:
            r = throughput.measure("hnet_1stage_tiny", L, B * L, iters, widths + [
                "models.HNetLM.dtype='bfloat16'", f"models.HNetConfig.chunk_impl='{impl}'"])
            row.update(status="ok", ms_median=1e3 * r["step_s"], compile_s=r["compile_s"], params=r["params"],
                       loss=r["loss"], **{"tokens/s": r["bytes_per_s"],
                                          "MFU": r["flops_per_byte"] * r["bytes_per_s"] / (peak_tflops * 1e12)})
        except Exception as e:
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            traceback.print_exc()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------
# (d) attention kernels
# ----------------------------------------------------------------------------------


def _qkv_segments(B, L, H, K, dtype, seed=0):
    """q, k, v [B, L, H, K] and segment ids [B, L]: three documents per row, then a padded tail (0)."""
    q, k, v = (jax.random.normal(kk, (B, L, H, K), jnp.float32).astype(dtype)
               for kk in jax.random.split(jax.random.key(seed), 3))
    pos = jnp.arange(L)
    seg = 1 + (pos >= L // 3).astype(jnp.int32) + (pos >= (2 * L) // 3).astype(jnp.int32)
    seg = jnp.where(pos < L - L // 16, seg, 0)
    return q, k, v, jnp.broadcast_to(seg, (B, L))


def attention_auto_picks(shape) -> dict:
    """{dtype: the kernel 'auto' picks} for causal self-attention of ``shape`` [B, L, H, K]."""
    picks = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        q = jax.ShapeDtypeStruct(shape, dtype)
        picks[jnp.dtype(dtype).name] = attention.resolve_impl(
            "auto", q, q, causal=True, window=-1, softmax1=False, key_bias_BxS=None)
    return picks


def check_attention(small: bool, iters: int) -> tuple[list[dict], list[dict]]:
    """-> (correctness rows, timing rows). Correctness in bf16 (fp32 for blockwise): max |kernel - dense|
    of the output and of dq, dk, dv over the valid (non-padding) queries, relative to max |dense|."""
    kernels = ["cudnn", "blockwise"] if jax.default_backend() == "gpu" else ["blockwise"]
    B, L, H, K = (2, 256, 2, 32) if small else (4, 2048, 4, 64)
    checks = []
    for impl in kernels:
        dtype = jnp.float32 if impl == "blockwise" else jnp.bfloat16
        tol = 1e-4 if dtype == jnp.float32 else 2e-2
        q, k, v, seg = _qkv_segments(B, L, H, K, dtype)
        valid = (seg > 0)[:, :, None, None]
        for window in (-1, 100):
            row = {"check": f"attention {impl} vs dense", "dtype": jnp.dtype(dtype).name, "window": window}

            def loss(q, k, v, impl=impl, window=window):
                o = attention.dot_product_attention(q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg,
                                                    causal=True, window=window, impl=impl)
                return jnp.sum(jnp.where(valid, o.astype(jnp.float32), 0.0) ** 2), o

            try:  # fp32 at full precision: GPUs may run fp32 dots as TF32 by default
                with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):
                    (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
                    (_, o_ref), g_ref = jax.jit(jax.value_and_grad(
                        functools.partial(loss, impl="dense"), argnums=(0, 1, 2), has_aux=True))(q, k, v)
                errs = []
                for a, b in [(o, o_ref), *zip(g, g_ref)]:
                    a, b = (jnp.where(valid, x.astype(jnp.float32), 0.0) for x in (a, b))
                    errs.append(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6)))
                row.update(max_abs_err=max(errs), ok=max(errs) <= tol)
            except Exception as e:
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                traceback.print_exc()
            checks.append(row)
        # causality: new q, k, v after position t leave every output at or before t bit-identical
        row = {"check": f"attention {impl} causal", "dtype": jnp.dtype(dtype).name, "window": -1}
        try:
            t = L // 2 + 5
            fwd = jax.jit(lambda q, k, v, impl=impl: attention.dot_product_attention(
                q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, impl=impl))
            q2, k2, v2, _ = _qkv_segments(B, L, H, K, dtype, seed=7)
            after = (jnp.arange(L) > t)[None, :, None, None]
            o1 = fwd(q, k, v)
            o2 = fwd(*(jnp.where(after, b, a) for a, b in [(q, q2), (k, k2), (v, v2)]))
            row["max_abs_err"] = float(jnp.max(jnp.abs(o1[:, :t + 1] - o2[:, :t + 1]).astype(jnp.float32)))
            row["ok"] = row["max_abs_err"] == 0.0 and bool(jnp.any(o1[:, t + 1:] != o2[:, t + 1:]))
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            traceback.print_exc()
        checks.append(row)

    B, L, H, K = (1, 512, 2, 32) if small else (8, 4096, 8, 64)
    timings = []
    for dtype in (jnp.bfloat16, jnp.float32):
        q, k, v, seg = _qkv_segments(B, L, H, K, dtype, seed=1)
        for impl in ["dense", *kernels]:
            row = {"op": "attention fwd+bwd", "impl": impl, "shape": f"B{B} L{L} H{H} K{K} {jnp.dtype(dtype).name}"}
            if not attention._supports(impl, q, k, causal=True, window=-1, softmax1=False, key_bias_BxS=None):
                continue

            def f(q, k, v, impl=impl):
                o = attention.dot_product_attention(q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, impl=impl)
                return jnp.sum(o.astype(jnp.float32))

            try:
                row.update(_time(jax.jit(jax.grad(f, argnums=(0, 1, 2))), q, k, v, iters=iters))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            timings.append(row)
    return checks, timings


# ----------------------------------------------------------------------------------


def _table(rows, cols) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols)), "  ".join("-" * n for n in w)]
    lines += ["  ".join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test; interpret mode on CPU)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "device_check.json"))
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20, 2 with --small)")
    ap.add_argument("--peak-tbps", type=float, default=4.8, help="HBM peak for frac_peak (H200: 4.8 TB/s)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H200: 989 TFLOP/s)")
    ap.add_argument("--tiles", default=None, help="comma list of kernel tile_rows (default 16,32,64; 8 small)")
    ap.add_argument("--skip-train", action="store_true", help="skip the H-Net train step hook")
    ap.add_argument("--only", choices=["gather", "train", "attention"], default=None, help="run one part only")
    args = ap.parse_args(argv)
    iters = args.iters or (2 if args.small else 20)
    tiles = [int(t) for t in args.tiles.split(",")] if args.tiles else ([8] if args.small else [16, 32, 64])

    backend, interpret = _kernel_setup()
    info = {
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "python": platform.python_version(),
        "kernel_backend": backend,
        "interpret": interpret,
        "small": args.small,
        "iters": iters,
        "peak_tbps": args.peak_tbps,
        "attention_auto_L4096": attention_auto_picks((8, 4096, 8, 64)),
    }
    print(json.dumps(info, indent=1))

    correctness, timings, train = [], [], []
    if args.only in (None, "gather"):
        correctness = check_correctness(backend, interpret, args.small)
        print("\n(a) correctness\n" + _table(correctness, ["check", "dtype", "backend", "max_abs_err", "ok", "error"]))
        timings = time_gathers(backend, interpret, args.small, iters, args.peak_tbps, tiles)
        print("\n(b) timing\n" + _table(
            timings, ["op", "impl", "tile_rows", "shape", "ms_median", "ms_min", "GB/s", "frac_peak", "error"]))
    if args.only in (None, "train") and not args.skip_train:
        train = time_hnet_train_step(args.small, max(2, iters // 4), args.peak_tflops)
        print("\n(c) H-Net train step\n" + _table(
            train, ["op", "impl", "shape", "status", "compile_s", "ms_median", "tokens/s", "MFU", "loss", "error"]))
    attn_checks, attn_timings = [], []
    if args.only in (None, "attention"):
        attn_checks, attn_timings = check_attention(args.small, iters)
        print("\n(d) attention\n" + _table(attn_checks, ["check", "dtype", "window", "max_abs_err", "ok", "error"])
              + "\n\n" + _table(attn_timings, ["op", "impl", "shape", "ms_median", "ms_min", "first_call_s", "error"]))
    correctness += attn_checks
    timings += attn_timings

    result = {"info": info, "correctness": correctness, "timings": timings, "train_step": train}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {args.out}")
    return 0 if all(r.get("ok") for r in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
