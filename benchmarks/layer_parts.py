"""Each part of a Transformer block, and a Mamba-2 layer, alone, forward + backward: ours (jit, hnet.layers)
against the same maths in torch eager, on the same CPU threads. Where the whole-step comparison (peers.py)
says who wins, this says which part wins, and at what FLOP rate.

    .venv/bin/python benchmarks/layer_parts.py                      # isotropic_tiny's shapes: 8 x 1024, d 128
    .venv/bin/python benchmarks/layer_parts.py --shape 2x4096x128x4 --d_ff 384

A shape is BxLxDxH (head dim D / H). Parts: ``matmul`` (the q/k/v projection alone: D -> 3D), ``rmsnorm``,
``qkv_rope`` (projection, split, RoPE on q and k), ``attention`` (causal self-attention of given q, k, v;
ours with three packed documents per row through the blockwise kernel, torch's SDPA with its causal flag and
no document mask), ``swiglu`` (D -> 2F -> D), ``block`` (pre-norm: x + out(attn(qkv(norm(x)))), then
x + swiglu(norm(x))), ``mamba2`` (hnet_1stage_tiny's byte-level layer: expand 2, N = 32, head dim 32,
SSD chunk 32; ours only: no CPU Mamba-2 in torch). Each call computes the output and the backward of a fixed
random cotangent with respect to the inputs and the weights. GFLOP is XLA's count of our call on its
reference program (``train.step.flops_per_byte``'s rule: attention as the full masked square, although both
kernels skip the blocks above the diagonal), so GFLOP/s is the same work over each side's time. Ours and
torch alternate in rounds (min of 3 calls per round, median over ``--rounds``). torch runs with
OMP_WAIT_POLICY=PASSIVE (set here before torch is imported). Without torch, ours only. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (same directory)

PARTS = ("matmul", "rmsnorm", "qkv_rope", "attention", "swiglu", "block", "mamba2")


def segments(B: int, L: int):
    """Three packed documents per row: segment ids [B, L] (1, 2, 3), numpy."""
    import numpy as np

    return np.broadcast_to(1 + np.arange(L) * 3 // L, (B, L)).astype(np.int32)


def jax_parts(B: int, L: int, D: int, H: int, F: int) -> dict:
    """{part: (fn(params, *inputs, cotangent) -> (output, grads), params, inputs, cotangent)}; fn is not
    jitted: ``gflop`` traces it under ``reference_kernels``, and a jitted fn would keep that trace."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hnet import layers
    from hnet.mamba2 import Mamba2

    rng = np.random.default_rng(0)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    seg = jnp.asarray(segments(B, L))
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None], (B, L))
    rngs = nnx.Rngs(0)
    attn = layers.Attention(D, H, rngs=rngs)
    cfg = layers.StackConfig(layout="T1", d_model=D, d_ff=F, num_heads=H)
    modules = {
        "matmul": (attn.wqkv, lambda m, x: m(x), (3 * D,)),
        "rmsnorm": (layers.RMSNorm(D), lambda m, x: m(x), (D,)),
        "qkv_rope": (attn, lambda m, x: jnp.stack(m.qkv(x, pos)), (3, B, L, H, D // H)),
        "attention": (attn, lambda m, q, k, v: m.attend(q, k, v, seg), (B, L, D)),
        "swiglu": (layers.SwiGLU(D, F, rngs=rngs), lambda m, x: m(x), (D,)),
        "block": (layers.Block("t", True, cfg, out_init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                               length_axis="byte_len", rngs=rngs), lambda m, x: m(x, seg, pos), (D,)),
        "mamba2": (Mamba2(D, d_state=32, headdim=32, chunk_size=32, rngs=rngs), lambda m, x: m(x, seg), (D,)),
    }
    out = {}
    for part, (module, apply, out_tail) in modules.items():
        graph, params = nnx.split(module)
        inputs = (arr(B, L, H, D // H), arr(B, L, H, D // H), arr(B, L, H, D // H)) if part == "attention" else (
            arr(B, L, D),)
        cot = arr(*((B, L) + out_tail if len(out_tail) == 1 else out_tail))

        def grads(params, *xs, graph=graph, apply=apply):  # returns the output too: no dead forward matmul
            y, vjp = jax.vjp(lambda p, *a: apply(nnx.merge(graph, p), *a), params, *xs[:-1])
            return y, vjp(xs[-1])

        out[part] = (grads, params, inputs, cot)
    return out


def gflop(fn, *args) -> float:
    """``train.step.reference_flops`` of ``fn(*args)``, in GFLOP."""
    from train.step import reference_flops

    return reference_flops(fn, *args) / 1e9


def torch_parts(B: int, L: int, D: int, H: int, F: int) -> dict:
    """{part: fn() running forward + backward of a fixed cotangent} in torch eager, the same maths."""
    import torch
    import torch.nn.functional as tf

    torch.manual_seed(0)
    K = D // H
    p = lambda *s: (torch.randn(*s) * 0.02).requires_grad_()  # noqa: E731
    x = torch.randn(B, L, D, requires_grad=True)
    wqkv, wo, w1, w2 = p(3 * D, D), p(D, D), p(2 * F, D), p(D, F)
    g1, g2 = torch.ones(D, requires_grad=True), torch.ones(D, requires_grad=True)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(K // 2, dtype=torch.float32) * 2.0 / K))

    def rope(t):  # [B, L, H, K], rotate-half on all K channels
        ang = torch.arange(L, dtype=torch.float32)[:, None] * inv_freq
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        t1, t2 = t[..., :K // 2], t[..., K // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def qkv(h):
        q, k, v = tf.linear(h, wqkv).view(B, L, 3, H, K).unbind(2)
        return rope(q), rope(k), v

    def attend(q, k, v):  # [B, L, H, K] -> [B, L, D]
        o = tf.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2).reshape(B, L, D)

    def swiglu(h):
        value, gate = tf.linear(h, w1).chunk(2, dim=-1)
        return tf.linear(tf.silu(gate) * value, w2)

    def block(h):
        h = h + tf.linear(attend(*qkv(tf.rms_norm(h, (D,), g1, 1e-5))), wo)
        return h + swiglu(tf.rms_norm(h, (D,), g2, 1e-5))

    qkv_in = [torch.randn(B, L, H, K, requires_grad=True) for _ in range(3)]
    fns = {
        "matmul": (lambda: tf.linear(x, wqkv), (B, L, 3 * D)),
        "rmsnorm": (lambda: tf.rms_norm(x, (D,), g1, 1e-5), (B, L, D)),
        "qkv_rope": (lambda: torch.stack(qkv(x)), (3, B, L, H, K)),
        "attention": (lambda: attend(*qkv_in), (B, L, D)),
        "swiglu": (lambda: swiglu(x), (B, L, D)),
        "block": (lambda: block(x), (B, L, D)),
    }
    out = {}
    for part, (fwd, shape) in fns.items():
        cot = torch.randn(*shape)
        out[part] = lambda fwd=fwd, cot=cot: fwd().backward(cot)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8x1024x128x4", help="BxLxDxH")
    ap.add_argument("--d_ff", type=int, default=384)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(throughput.ROOT, "benchmarks/out/layer_parts.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax

    B, L, D, H = (int(v) for v in args.shape.split("x"))
    ours, theirs = jax_parts(B, L, D, H, args.d_ff), {}
    if importlib.util.find_spec("torch") is None:
        print("layer_parts.py: torch is not installed, ours only (.venv/bin/pip install -e '.[bench]')")
    else:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        theirs = torch_parts(B, L, D, H, args.d_ff)
    runs, work = {}, {}
    for part in args.parts:
        fn, params, inputs, cot = ours[part]
        work[part] = gflop(fn, params, *inputs, cot)
        runs[part] = {"ours": lambda fn=jax.jit(fn), a=(params, *inputs, cot): jax.block_until_ready(fn(*a))}
        if part in theirs:
            runs[part]["torch"] = theirs[part]
        for f in runs[part].values():
            f()  # compile / warm up
    times = {part: {side: [] for side in sides} for part, sides in runs.items()}
    for _ in range(args.rounds):
        for part, sides in runs.items():
            for side, f in sides.items():
                times[part][side].append(min(throughput.timed(f, 3)))
    rows = []
    print(f"shape {args.shape}, d_ff {args.d_ff}, {args.rounds} rounds, output + backward\n"
          "| part | GFLOP | ours (ms) | ours GFLOP/s | torch (ms) | torch GFLOP/s | torch / ours |\n"
          "|---|---|---|---|---|---|---|")
    for part, t in times.items():
        row = {"part": part, "gflop": work[part], "ours_s": statistics.median(t["ours"]), "ours_rounds": t["ours"]}
        if "torch" in t:
            row.update(torch_s=statistics.median(t["torch"]), torch_rounds=t["torch"],
                       speedup=statistics.median(b / a for a, b in zip(t["ours"], t["torch"])))
        rows.append(row)
        rate = lambda s: f"{work[part] / s:.0f}"  # noqa: E731
        theirs_cols = (f"{row['torch_s'] * 1e3:.1f} | {rate(row['torch_s'])} | {row['speedup']:.2f}x"
                       if "torch" in t else "– | – | –")
        print(f"| {part} | {work[part]:.2f} | {row['ours_s'] * 1e3:.1f} | {rate(row['ours_s'])} | {theirs_cols} |",
              flush=True)
    throughput.write_json(args.out, rows, shape=args.shape, d_ff=args.d_ff, rounds=args.rounds)


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # time the runtime the CLIs use (train/malloc.py)
    main()
