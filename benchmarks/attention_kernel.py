"""Self-attention alone, forward + backward: the blockwise kernel at several tile sizes against the dense
path and, when torch is installed, torch's scaled_dot_product_attention on the same CPU threads.

    .venv/bin/python benchmarks/attention_kernel.py                      # the shapes of docs/benchmarks.md
    .venv/bin/python benchmarks/attention_kernel.py --shapes 8x1024x4x32 --tiles auto 64x64 128x128 256x128
    # H-Net's main network: M = 512 chunk slots, K = 64, 45 % of them real (padded tail skipped)
    .venv/bin/python benchmarks/attention_kernel.py --shapes 8x512x4x64 --fill 0.45 --tiles auto 128x256

A shape is BxLxHxK. Each row is causal self-attention over three packed documents per row (the real part
when ``--fill`` < 1, then a padded tail that the kernel skips); the loss is sum(o * cos(o)), so the
backward sees a dense cotangent. The jitted variants run in alternating rounds (min of 3 calls per round,
median over ``--rounds``) so machine load hits all alike; torch (no document mask: SDPA's causal flag) runs
after them, median of 5 steps. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (same directory)

DEFAULT_SHAPES = ["8x1024x4x32", "2x4096x4x32", "1x8192x4x32"]
DENSE_MAX_LEN = 4096  # the dense path's [B, H, L, L] logits: 1 GiB per head-batch at L = 8192


def inputs(B: int, L: int, H: int, K: int, fill: float):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, H, K)), jnp.float32) for _ in range(3))
    seg = np.zeros((B, L), np.int32)
    for b in range(B):  # rows fill 0.8..1.2 x fill of L, three documents each, then padding
        n = min(L, int(L * fill * (0.8 + 0.4 * b / max(B - 1, 1))))
        seg[b, :n] = 1 + np.arange(n) * 3 // max(n, 1)
    return q, k, v, jnp.asarray(seg)


def jax_variants(tiles: list[str], skip_padding: bool):
    """{name: attention(q, k, v, seg)}: 'dense' and one blockwise variant per tile spec."""
    import functools

    from hnet.attention import dot_product_attention
    from hnet.kernels.blockwise_attention import blockwise_attention

    out = {"dense": functools.partial(dot_product_attention, impl="dense")}
    for t in tiles:
        bq, bk = (None, None) if t == "auto" else map(int, t.split("x"))
        out[f"blockwise {t}"] = functools.partial(blockwise_attention, block_q=bq, block_k=bk,
                                                  skip_padding=skip_padding)
    return out


def time_jax(shape: tuple[int, ...], fill: float, tiles: list[str], rounds: int, dense: bool) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    q, k, v, seg = inputs(*shape, fill)
    fns = {}
    for name, attn in jax_variants(tiles, skip_padding=fill < 1).items():
        if name == "dense" and (not dense or shape[1] > DENSE_MAX_LEN):
            continue

        def loss(q, k, v, attn=attn):
            o = attn(q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, causal=True, window=-1, softmax1=False)
            return jnp.sum(o * jnp.cos(o))

        fns[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        jax.block_until_ready(fns[name](q, k, v))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(min(throughput.timed(lambda: jax.block_until_ready(fn(q, k, v)), 3)))
    return {name: statistics.median(t) for name, t in times.items()}


def time_torch(B: int, L: int, H: int, K: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    q, k, v = (torch.randn(B, H, L, K, requires_grad=True) for _ in range(3))

    def step():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        (o * torch.cos(o)).sum().backward()

    throughput.timed(step, 2)
    return statistics.median(throughput.timed(step, 5))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxLxHxK")
    ap.add_argument("--tiles", nargs="+", default=["auto", "128x128"], help="'auto' or QxK tile sizes")
    ap.add_argument("--fill", type=float, default=1.0, help="real share of each row (the rest: a padded tail)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no_dense", action="store_true",
                    help=f"skip the dense path (it holds [B, H, L, L] logits; always skipped above L = {DENSE_MAX_LEN})")
    ap.add_argument("--out", default=os.path.join(throughput.ROOT, "benchmarks/out/attention_kernel.json"))
    args = ap.parse_args(argv)
    from hnet.kernels.blockwise_attention import tile_sizes

    rows = []
    print("| shape BxLxHxK | fill | variant | tiles | fwd+bwd (ms) |\n|---|---|---|---|---|")
    for spec in args.shapes:
        B, L, H, K = shape = tuple(int(x) for x in spec.split("x"))
        results = time_jax(shape, args.fill, args.tiles, args.rounds, not args.no_dense)
        if args.fill == 1.0:
            results["torch SDPA (no document mask)"] = time_torch(*shape)
        auto = "x".join(map(str, tile_sizes(B * H, L, L)))
        for name, sec in results.items():
            if sec is None:
                continue
            tiles = {"blockwise auto": auto}.get(name, name.split()[-1] if name.startswith("blockwise") else "–")
            rows.append({"shape": spec, "fill": args.fill, "variant": name, "tiles": tiles, "seconds": sec})
            print(f"| {spec} | {args.fill} | {name} | {tiles} | {sec * 1e3:.1f} |", flush=True)
    throughput.write_json(args.out, rows, rounds=args.rounds)


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # time the runtime the CLIs use (train/malloc.py)
    main()
