"""Our training throughput next to the PyTorch implementations on PyPI, at matched configs on the same CPU.

    .venv/bin/pip install -e '.[bench]'      # torch (CPU), h-net-dynamic-chunking, megabyte-pytorch
    .venv/bin/python benchmarks/peers.py --seq_lens 1024 4096 --rounds 2 --out docs/peers_cpu.json
    .venv/bin/python benchmarks/peers.py --profile --pairs transformer --seq_lens 1024   # torch.profiler op table

Pairs (ours <-> peer; every mismatch is printed and written to the JSON):
  hnet         hnet_1stage_tiny  <-> h_net_dynamic_chunking.HNet (x-transformers encoder / main / decoder)
  hnet_attn    the same with attention instead of Mamba-2 in our encoder and decoder, as the peer has
  megabyte     fixed_tiny        <-> MEGABYTE_pytorch.MEGABYTE, 2 stages, patch 4
  transformer  isotropic_tiny    <-> MEGABYTE_pytorch.MEGABYTE, 1 stage (a plain byte Transformer)
  transformer_ffn_matched        the same with our SwiGLU at d_ff 256: the peer's FFN FLOPs and parameters
  transformer_xt isotropic_tiny  <-> x_transformers.Decoder with isotropic_tiny's architecture (SwiGLU, RoPE,
                                     RMSNorm, no biases): the like-for-like Transformer

A measurement is one subprocess (so peak RSS is its own): a full training step (forward + backward +
clipped AdamW) in fp32 on the same bytes per step and the same number of CPU threads, one warm-up step
(JAX: after compilation), then the median of --steps timed steps. Ours and the peer alternate
(ours, peer, ours, peer, ...) for --rounds rounds so machine load hits both alike; the primary figure is
the median over rounds of (our bytes/s) / (peer bytes/s). Exits 0 with a message if the peers are missing.

Ours runs under train/malloc.py's glibc malloc tunables, as the CLIs do (throughput.py re-executes itself with
them); the peer under glibc's defaults, as its package ships, unless --peer_malloc_tunables (torch gained
5-11 % from them, XLA:CPU 1.3-1.5x: docs/benchmarks.md, session 12). Each side's JSON row records its
GLIBC_TUNABLES.

The peer runs with OMP_WAIT_POLICY=PASSIVE: on a loaded machine, OpenMP's spinning worker threads made torch
steps 10-30x slower (measured: 5-7 s vs 0.15-0.4 s for the same step), which would flatter our ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (same directory)
from train import malloc  # noqa: E402

PEER_MODULES = ("torch", "h_net_dynamic_chunking", "MEGABYTE_pytorch", "x_transformers")
SKIP_MSG = ("peers.py: skipped, {missing} not installed. Install the benchmark extra: "
            ".venv/bin/pip install -e '.[bench]' "
            "(torch CPU wheel: --extra-index-url https://download.pytorch.org/whl/cpu)")

# ours: config name; peer: what is built; mismatch: every known difference between the two models.
PAIRS = {
    "hnet": dict(ours="hnet_1stage_tiny", peer="h-net-dynamic-chunking HNet", mismatch=[
        "encoder/decoder: 2 causal attention layers each (x-transformers, d128, 4 heads, no FFN) instead of "
        "our 2 Mamba-2 layers each (the package ships no Mamba-2; mamba-ssm needs CUDA)",
        "main network: x-transformers Decoder T4 d256, 4 heads, SwiGLU ff_mult 3 (= our d_ff 768), RoPE, RMSNorm: "
        "matched",
        "chunker: the package's DynamicSequenceChunker (target N = 6, ratio loss 0.03) pads the inner sequence to "
        "the longest chunk count in the batch; ours has a static capacity M = L/2",
        "attention through torch SDPA (attn_flash=True); no document masking (ours resets at BOS)"]),
    "hnet_attn": dict(ours="hnet_1stage_tiny", bindings=["models.HNetConfig.arch_layout = ['t2', ['T4'], 't2']"],
                      peer="h-net-dynamic-chunking HNet", mismatch=[
        "as 'hnet', but our encoder and decoder are the peer's too: 2 causal attention layers each (d128, 4 heads "
        "x 32, RoPE, no FFN) instead of Mamba-2: the same architecture on both sides",
        "chunker: the package's DynamicSequenceChunker pads the inner sequence to the longest chunk count in the "
        "batch; ours has a static capacity M = L/2",
        "attention through torch SDPA (attn_flash=True); no document masking (ours resets at BOS)"]),
    "megabyte": dict(ours="fixed_tiny", peer="megabyte-pytorch MEGABYTE (2 stages, patch 4)", mismatch=[
        "global model: T2 d128 over L/4 patches (ours: backbone T2 d128 over groups of 4): matched",
        "byte level: MEGABYTE's local T4 attends only within each 4-byte patch; ours runs pre T2 + post T2 "
        "with causal attention over the whole window (more FLOPs on our side)",
        "patch embedding: concat of 4 byte embeddings + LayerNorm + Linear (ours: mean of the pre stack's outputs)",
        "FFN: GELU ff_mult 3 (2 matrices) vs our SwiGLU d_ff 384 (3 matrices); token shift in every layer",
        "attention through torch SDPA (flash_attn=True), RoPE (rel_pos=True)"]),
    "transformer": dict(ours="isotropic_tiny", peer="megabyte-pytorch MEGABYTE (1 stage)", mismatch=[
        "T4 d128, 4 heads x 32, RoPE, RMSNorm, causal over the whole window: matched",
        "FFN: GELU ff_mult 3 (2 matrices) vs our SwiGLU d_ff 384 (3 matrices); token shift in every layer",
        "attention through torch SDPA (flash_attn=True); no document masking (ours resets at BOS)"]),
    "transformer_xt": dict(ours="isotropic_tiny", peer="x-transformers Decoder (our isotropic_tiny's architecture)",
                           mismatch=[
        "T4 d128, 4 heads x 32, RoPE on all 32 dims, pre-RMSNorm and a final RMSNorm, SwiGLU d_ff 384 "
        "(3 matrices), bias-free attention projections, Embedding(256, 128), bias-free head: matched",
        "x-transformers' GLU input projection has a bias (768 per layer; ff_no_bias drops only the output's)",
        "attention through torch SDPA (attn_flash=True); no document masking (ours resets at BOS)"]),
    "transformer_ffn_matched": dict(ours="isotropic_tiny", bindings=["hnet.StackConfig.d_ff = 256"],
                                    peer="megabyte-pytorch MEGABYTE (1 stage)", mismatch=[
        "as 'transformer', but our SwiGLU has d_ff 256 (3 matrices, 98K weights per layer), the peer's GELU FFN's "
        "FLOPs and parameters (2 matrices of 128 x 384)",
        "token shift in every layer; attention through torch SDPA; no document masking (ours resets at BOS)"]),
}


def missing_modules() -> list[str]:
    return [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]


def build_peer(name: str, seq_len: int):
    """The peer model and ``loss(ids [B, L+1]) -> scalar``: next-byte cross-entropy on L targets."""
    import torch.nn.functional as F
    from torch import nn

    if name == "transformer_xt":
        from x_transformers import Decoder

        dec = Decoder(dim=128, depth=4, heads=4, attn_dim_head=32, rotary_pos_emb=True, rotary_emb_dim=32,
                      use_rmsnorm=True, ff_mult=3, ff_glu=True, ff_swish=True, ff_no_bias=True, attn_flash=True)
        model = nn.ModuleDict(dict(emb=nn.Embedding(256, 128), dec=dec, head=nn.Linear(128, 256, bias=False)))

        def loss(ids):
            logits = model["head"](model["dec"](model["emb"](ids[:, :-1])))
            return F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))

        return model, loss

    if name in ("hnet", "hnet_attn"):
        from h_net_dynamic_chunking import HNet
        from x_transformers import Decoder  # HNet's dict configs add a kwarg x-transformers 2.31 rejects


        common = dict(heads=4, rotary_pos_emb=True, use_rmsnorm=True, attn_flash=True)
        enc = dict(dim=128, attn_dim_head=32, rotary_emb_dim=32, custom_layers=("a", "a"), **common)
        main = dict(dim=256, depth=4, attn_dim_head=64, rotary_emb_dim=64, ff_mult=3, ff_glu=True, ff_swish=True,
                    **common)
        net = HNet(Decoder(**enc), Decoder(**main), Decoder(**enc), dim=128, dim_inner=256, target_avg_token_length=6.0)
        model = nn.ModuleDict(dict(emb=nn.Embedding(256, 128), net=net, head=nn.Linear(128, 256)))

        def loss(ids):
            out = model["net"](model["emb"](ids[:, :-1]))
            logits = model["head"](out.output)
            return F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)) + out.loss

        return model, loss

    from MEGABYTE_pytorch import MEGABYTE

    stages = dict(dim=(128, 128), depth=(2, 4), max_seq_len=(seq_len // 4, 4)) if name == "megabyte" else \
        dict(dim=128, depth=(4,), max_seq_len=(seq_len,))
    model = MEGABYTE(num_tokens=256, dim_head=32, heads=4, ff_mult=3, rel_pos=True, flash_attn=True, **stages)
    return model, lambda ids: model(ids[:, 1:], return_loss=True)  # MEGABYTE predicts every byte from a start token


def peer_step(name: str, seq_len: int, bytes_per_step: int):
    """(model, one_step(), batch): one training step of the peer on CPython's pydoc topics, same thread count."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the module docstring
    import numpy as np
    import torch
    from pydoc_data.topics import topics

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, loss_fn = build_peer(name, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    text = np.frombuffer("".join(topics.values()).encode(), np.uint8)
    batch, rng = max(1, bytes_per_step // seq_len), np.random.default_rng(0)

    def one_step():
        starts = rng.integers(0, len(text) - seq_len - 1, batch)
        ids = torch.from_numpy(np.stack([text[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return model, one_step, batch


def measure_peer(name: str, seq_len: int, bytes_per_step: int, steps: int) -> dict:
    """Runs in the child process: same text, bytes per step and thread count as ours."""
    import numpy as np
    import torch

    model, one_step, batch = peer_step(name, seq_len, bytes_per_step)
    box = {}

    def step():
        box["loss"] = one_step()

    first_s = throughput.timed(step, 1)[0]
    times = throughput.timed(step, steps)
    step_s = float(np.median(times))
    return {"config": PAIRS[name]["peer"], "seq_len": seq_len, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()), "first_step_s": first_s, "step_s": step_s,
            "step_times_s": times, "bytes_per_s": batch * seq_len / step_s, "peak_rss_mb": throughput.peak_rss_mb(),
            "loss": box["loss"].item(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def profile_peer(name: str, seq_len: int, bytes_per_step: int, top: int = 20) -> str:
    """torch.profiler table (self CPU time per op) of one step after a warm-up step."""
    import torch

    _, one_step, _ = peer_step(name, seq_len, bytes_per_step)
    one_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def summarize(pair: str, seq_len: int, rounds: list[tuple[dict, dict]]) -> dict:
    ratios = [o["bytes_per_s"] / p["bytes_per_s"] for o, p in rounds]
    med = lambda k, side: statistics.median(r[side][k] for r in rounds)  # noqa: E731
    ours = " ".join([PAIRS[pair]["ours"], *PAIRS[pair].get("bindings", [])])
    return {"pair": pair, "ours": ours, "peer": PAIRS[pair]["peer"], "seq_len": seq_len,
            "ratio": statistics.median(ratios), "ratios": ratios,
            "ours_bytes_per_s": med("bytes_per_s", 0), "peer_bytes_per_s": med("bytes_per_s", 1),
            "ours_step_s": med("step_s", 0), "peer_step_s": med("step_s", 1),
            "ours_params": rounds[0][0]["params"], "peer_params": rounds[0][1]["params"],
            "ours_peak_rss_mb": med("peak_rss_mb", 0), "peer_peak_rss_mb": med("peak_rss_mb", 1),
            "load_1min": [x for o, p in rounds for x in (o["load_before"][0], p["load_before"][0], p["load_after"][0])],
            "mismatch": PAIRS[pair]["mismatch"], "rounds": [{"ours": o, "peer": p} for o, p in rounds]}


def markdown_table(summaries: list[dict]) -> str:
    out = ["| ours | peer | L | params ours / peer | step (ms) ours / peer | bytes/s ours / peer | "
           "**ratio** (rounds) | peak RSS (MB) ours / peer | load 1 min |", "|---" * 9 + "|"]
    for s in summaries:
        out.append(f"| {s['ours']} | {s['peer']} | {s['seq_len']} | {s['ours_params'] / 1e6:.2f}M / "
                   f"{s['peer_params'] / 1e6:.2f}M | {s['ours_step_s'] * 1e3:.0f} / {s['peer_step_s'] * 1e3:.0f} | "
                   f"{s['ours_bytes_per_s']:.0f} / {s['peer_bytes_per_s']:.0f} | **{s['ratio']:.2f}×** "
                   f"({', '.join(f'{r:.2f}' for r in s['ratios'])}) | {s['ours_peak_rss_mb']:.0f} / "
                   f"{s['peer_peak_rss_mb']:.0f} | {min(s['load_1min']):.1f}–{max(s['load_1min']):.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--seq_lens", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--bytes_per_step", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    ap.add_argument("--rounds", type=int, default=2, help="ours/peer alternations per pair and length")
    ap.add_argument("--out", default=os.path.join(throughput.ROOT, "benchmarks/out/peers.json"),
                    help="JSON, rewritten after every pair and length")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table of each peer instead")
    ap.add_argument("--peer_malloc_tunables", action="store_true",
                    help="run the peer under our glibc malloc settings too (train/malloc.py; ours always has them)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    missing = missing_modules()
    if missing:
        print(SKIP_MSG.format(missing=", ".join(missing)))
        return 0
    if args.child:
        name, L = args.child.split("@")
        print("RESULT " + json.dumps(measure_peer(name, int(L), args.bytes_per_step, args.steps)))
        return 0
    if args.profile:
        for L in args.seq_lens:
            for pair in args.pairs:
                print(f"{PAIRS[pair]['peer']} L={L}\n{profile_peer(pair, L, args.bytes_per_step)}", flush=True)
        return 0
    peer_env = {"GLIBC_TUNABLES": malloc.tunables(os.environ)} if args.peer_malloc_tunables else None
    summaries = []
    for L in args.seq_lens:
        for pair in args.pairs:
            rounds = []
            for i in range(args.rounds):
                ours = throughput.measure_in_subprocess(PAIRS[pair]["ours"], L, args.bytes_per_step, args.steps,
                                                        PAIRS[pair].get("bindings", []))
                peer = throughput.run_child(os.path.abspath(__file__), [
                    "--child", f"{pair}@{L}", "--bytes_per_step", str(args.bytes_per_step), "--steps", str(args.steps)],
                    env=peer_env)
                if ours is None or peer is None:
                    break
                rounds.append((ours, peer))
                print(f"{pair:12s} L={L:5d} round {i}: ours {ours['bytes_per_s']:8.0f} B/s, peer "
                      f"{peer['bytes_per_s']:8.0f} B/s, ratio {ours['bytes_per_s'] / peer['bytes_per_s']:.2f} "
                      f"(load {throughput.load_str(ours)}, {throughput.load_str(peer)})", flush=True)
            if rounds:
                summaries.append(summarize(pair, L, rounds))
                throughput.write_json(args.out, summaries, bytes_per_step=args.bytes_per_step, steps=args.steps,
                                      rounds=args.rounds)
    if summaries:
        print("\n" + markdown_table(summaries))
        for pair in dict.fromkeys(s["pair"] for s in summaries):
            print(f"\n{PAIRS[pair]['ours']} vs {PAIRS[pair]['peer']}, mismatches:\n"
                  + "\n".join(f"- {m}" for m in PAIRS[pair]["mismatch"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
