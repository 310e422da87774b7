"""H-Net with dynamic chunking (Hwang, Wang, Gu 2025; spec: shared/reference/hnet.md), 1 or more stages.

Stage s (outer):  x -> [pad to D_s] -> encoder -> x̂ ; r = residual_proj(x̂) (fp32)
                  router(x̂) -> p, b ; chunks = compact(x̂, b, M_s) -> inner stage -> ẑ
                  z̄ = EMA over chunk index (P_j = p at chunk starts, reset at documents) ;
                  z̃ = expand(z̄, b) ; decoder(z̃ · STE(c) + r) -> truncate to D_{s-1}
Innermost stage:  [pad] -> main isotropic stack -> truncate.

Static shapes: each outer stage has a capacity M_s = ceil(capacity_s · L_s) in training (M_s = L_s in
eval mode: no overflow, every byte scored). Chunks past M_s are dropped; the bytes that would read them
get ``target_mask`` False (never silently scored) and the overflow is counted in the metrics. Compacted
chunks fill the front of the M_s slots and padding trails them, so an inner stage may skip that tail: its
attention skips the query tiles after the last chunk (``StackConfig.padded_tail``), and in eval mode, where
a trained router fills ~1/N of the L slots, the outermost stage runs its inner stage on only as many slots
as the batch fills (``HNetStage.run_inner``, ``eval_capacity_buckets``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.attention import padded_tail_length
from hnet.boundary_rules import doc_starts, offsets_since_start
from hnet.layers import Linear, Stack, StackConfig, layout_height, ste_one
from hnet.sharding import constrain, param_init
from models.base import ByteLM, ModelOutput, capacity_slots, configurable, dtype_from_name
from models.common import byte_embed, lm_head, masked_update


@configurable
@dataclasses.dataclass(frozen=True)
class HNetConfig:
    """Per-stage lists are indexed by stage (0 = bytes). ``arch_layout`` nests like the reference:
    ['m4', ['T22'], 'm4'] (1-stage) or ['m4', ['T1m4', ['T26'], 'm4T1'], 'm4'] (2-stage)."""

    arch_layout: Any = ("m4", ("T4",), "m4")
    d_model: Sequence[int] = (128, 192)
    d_ff: Sequence[int] = (0, 512)
    num_heads: Sequence[int] = (4, 4)
    rotary_dim: Sequence[int] | None = None  # per stage; None = head_dim // 2 (H-Net: RoPE on half the head)
    window: Sequence[int] = (-1, -1)
    ratio_targets: Sequence[float] = (6.0,)  # N_s per outer stage
    capacity: Sequence[float] = (0.5,)  # M_s / L_s per outer stage
    # eval mode (M = L slots, no overflow): the outermost stage runs its inner stage on only the first S slots,
    # S = the smallest of M·k/n (k = 1..n) that holds every row's chunks (n compiled copies, forward only)
    eval_capacity_buckets: int = 4
    ratio_loss_weight: float = 0.03  # alpha
    ssm_d_state: int = 128
    ssm_d_conv: int = 4
    ssm_expand: int = 2
    ssm_headdim: int = 64
    ssm_chunk_size: int = 256
    lr_modulation: str | Sequence[float] | None = "eq11"  # 'eq11' | explicit per-stage list | None
    n_gpt: float = 4.6  # bytes per GPT-2 token in Eq. 11
    chunk_impl: str | None = None  # compact/expand gather: None = per backend default, 'jnp', 'pallas'

    @property
    def num_stages(self) -> int:
        depth, node = 0, self.arch_layout
        while len(node) == 3:
            depth, node = depth + 1, node[1]
        return depth

    def layout_at(self, s: int):
        node = self.arch_layout
        for _ in range(s):
            node = node[1]
        return node

    def stack_config(self, s: int, layout: str) -> StackConfig:
        heads = self.num_heads[s]
        rot = self.rotary_dim[s] if self.rotary_dim is not None else (self.d_model[s] // heads) // 2
        return StackConfig(layout=layout, d_model=self.d_model[s], d_ff=self.d_ff[s], num_heads=heads,
                           rotary_dim=rot, window=self.window[s], ssm_d_state=self.ssm_d_state,
                           ssm_d_conv=self.ssm_d_conv, ssm_expand=self.ssm_expand, ssm_headdim=self.ssm_headdim,
                           ssm_chunk_size=self.ssm_chunk_size,
                           padded_tail=s > 0)  # inner stages: compacted chunks, then padding (never expanded)

    def lr_multipliers(self) -> list[float]:
        """Eq. 11: λ_s = sqrt(N_GPT · Π_{i≥s} N_i / Π_{i≥0} N_i · D_S / D_s), N_S = 1."""
        S = self.num_stages
        if self.lr_modulation is None:
            return [1.0] * (S + 1)
        if self.lr_modulation != "eq11":
            return [float(v) for v in self.lr_modulation]
        N = list(self.ratio_targets) + [1.0]
        total = math.prod(N)
        return [math.sqrt(self.n_gpt * math.prod(N[s:]) / total * self.d_model[S] / self.d_model[s])
                for s in range(S + 1)]


def ema_over_chunks(z_BxMxD, P_BxM, reset_BxM):
    """z̄_j = P_j ẑ_j + (1 - P_j) z̄_{j-1}, with (1 - P_j) := 0 at document starts (fp32 scan)."""
    a = jnp.where(reset_BxM, 0.0, 1.0 - P_BxM)[..., None]
    u = P_BxM[..., None] * z_BxMxD.astype(jnp.float32)

    def combine(left, right):
        a1, u1 = left
        a2, u2 = right
        return a1 * a2, a2 * u1 + u2

    return jax.lax.associative_scan(combine, (jnp.broadcast_to(a, u.shape), u), axis=1)[1]


def ratio_loss(b_BxL, p_BxL, valid_BxL, N: float):
    """Eq. 10: N/(N-1) · ((N-1)·F·G + (1-F)(1-G)), F = hard boundary rate (no grad), G = mean p."""
    n = jnp.maximum(jnp.sum(valid_BxL), 1)
    F = jax.lax.stop_gradient(jnp.sum(b_BxL * valid_BxL) / n)
    G = jnp.sum(p_BxL * valid_BxL) / n
    return N / (N - 1.0) * ((N - 1.0) * F * G + (1.0 - F) * (1.0 - G)), F, G


class Router(nnx.Module):
    """Cosine routing: p_t = (1 - cos(W_q x̂_{t-1}, W_k x̂_t)) / 2 (q on the previous position, as the
    reference code), p = 1 at position 0 and at document starts; b_t = p_t > 0.5 (strict)."""

    def __init__(self, d: int, param_dtype, rngs: nnx.Rngs):
        eye = lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype)  # noqa: E731
        mk = lambda: Linear(d, d, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype,  # noqa: E731
                            kernel_init=param_init(eye, ("router", None)), rngs=rngs)
        self.q_proj, self.k_proj = mk(), mk()

    def probs(self, prev_BxD, cur_BxD):
        q = self.q_proj(prev_BxD.astype(jnp.float32))
        k = self.k_proj(cur_BxD.astype(jnp.float32))
        cos = jnp.sum(q * k, -1) * jax.lax.rsqrt(
            jnp.maximum(jnp.sum(q * q, -1) * jnp.sum(k * k, -1), 1e-24))
        return jnp.clip((1.0 - cos) / 2.0, 0.0, 1.0)

    def __call__(self, x_BxLxD, segment_ids_BxL):
        prev = jnp.pad(x_BxLxD[:, :-1], ((0, 0), (1, 0), (0, 0)))
        p = self.probs(prev, x_BxLxD)
        real = segment_ids_BxL > 0
        p = jnp.where(doc_starts(segment_ids_BxL) & real, 1.0, p)
        p = jnp.where(real, p, 0.0)
        return p, p > 0.5


class HNetStage(nnx.Module):
    def __init__(self, cfg: HNetConfig, s: int, *, d_prev: int | None, n_res_offset: int, dtype, param_dtype,
                 remat: bool | str, rngs: nnx.Rngs):
        self.cfg, self.s, self.deterministic = cfg, s, False  # model.eval(): no capacity overflow
        D = cfg.d_model[s]
        self.d_prev = d_prev
        self.impl = cfg.chunk_impl
        self.pad = (nnx.Param(param_init(nnx.initializers.zeros, ("embed",))(None, (D - d_prev,), param_dtype))
                    if d_prev is not None and D > d_prev else None)
        layout = cfg.layout_at(s)
        axis = "byte_len" if s == 0 else "chunk_len"
        kw = dict(dtype=dtype, param_dtype=param_dtype, length_axis=axis, remat=remat, rngs=rngs)
        self.innermost = len(layout) == 1
        if self.innermost:
            self.main = Stack(cfg.stack_config(s, layout[0]), n_res=n_res_offset + layout_height(layout[0]), **kw)
            return
        enc, _, dec = layout
        n_res = n_res_offset + layout_height(enc) + layout_height(dec)
        self.encoder = Stack(cfg.stack_config(s, enc), n_res=n_res, **kw)
        self.router = Router(D, param_dtype, rngs)
        self.residual_proj = Linear(
            D, D, use_bias=True, dtype=jnp.float32, param_dtype=param_dtype,
            kernel_init=param_init(nnx.initializers.zeros, ("embed", None)),
            bias_init=param_init(lambda k, sh, dt: jax.random.uniform(k, sh, dt, -1 / math.sqrt(D), 1 / math.sqrt(D)),
                                 (None,)),
            rngs=rngs)
        self.inner = HNetStage(cfg, s + 1, d_prev=D, n_res_offset=n_res, dtype=dtype, param_dtype=param_dtype,
                               remat=remat, rngs=rngs)
        self.decoder = Stack(cfg.stack_config(s, dec), n_res=n_res, **kw)

    def _pad(self, x):
        if self.pad is None:
            return x
        pad = jnp.broadcast_to(self.pad[...].astype(x.dtype), (*x.shape[:-1], self.pad.shape[0]))
        return jnp.concatenate([x, pad], axis=-1)

    def _truncate(self, y):
        return y if self.d_prev is None else y[..., :self.d_prev]

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL):
        """-> (y_BxLxD_prev, ok_BxL: position reads only kept chunks, stats: list of per-stage dicts)."""
        x = self._pad(x_BxLxD)
        if self.innermost:
            return self._truncate(self.main(x, segment_ids_BxL, positions_BxL)), jnp.ones(x.shape[:2], bool), []
        cfg, s = self.cfg, self.s
        L = x.shape[1]
        M = capacity_slots(cfg.capacity[s], L, self.deterministic)
        xh = self.encoder(x, segment_ids_BxL, positions_BxL)
        r = self.residual_proj(xh.astype(jnp.float32))
        p, b = self.router(xh, segment_ids_BxL)

        z, _ = chunking.compact(xh, b, M, impl=self.impl)
        P = chunking.compact(p[..., None], b, M, impl=self.impl)[0][..., 0]
        zseg, = chunking.compact_ids(b, M, segment_ids_BxL)
        zstart = doc_starts(zseg)
        zh, inner_ok, stats = self.run_inner(constrain(z, ("batch", "chunk_len", "act_embed")), zseg,
                                             offsets_since_start(zstart))

        zbar = ema_over_chunks(zh, jnp.clip(P, 1e-4, 1 - 1e-4), zstart)
        ztil = chunking.expand(zbar, b, impl=self.impl)
        c = jnp.where(b, p, 1.0 - p)
        y = ztil * ste_one(c)[..., None] + r
        out = self.decoder(y, segment_ids_BxL, positions_BxL)

        dropped, byte_ok = chunking.overflow(b, M)
        ok = byte_ok & (chunking.expand(inner_ok[..., None].astype(jnp.float32), b, impl="jnp")[..., 0] > 0.5)
        real = segment_ids_BxL > 0
        loss, F, G = ratio_loss(b, p, real, cfg.ratio_targets[s])
        n_chunks = jnp.sum(b & real, axis=1)
        n_pos = jnp.sum(real, axis=1)
        stat = {"ratio_loss": loss, "boundary_rate": F, "boundary_prob": G,
                "positions_per_chunk": jnp.sum(n_pos) / jnp.maximum(jnp.sum(n_chunks), 1),
                "positions_per_chunk_row_mean": jnp.mean(n_pos / jnp.maximum(n_chunks, 1)),
                "overflow_chunks": jnp.sum(dropped).astype(jnp.float32),
                "boundaries": b}
        # chunk starts of the inner stages, mapped back to this stage's positions (for visualisation)
        inner_masks = [chunking.expand(st["boundaries"][..., None].astype(jnp.float32), b, impl="jnp")[..., 0] > 0.5
                       for st in stats]
        for st, m in zip(stats, inner_masks):
            st["boundaries"] = m & b
        return self._truncate(out), ok & real | ~real, [stat] + stats

    def run_inner(self, z_BxMxD, zseg_BxM, zpos_BxM):
        """``self.inner`` on the M compacted slots; in eval mode at the outermost stage, on the first S of them,
        S = the smallest of M·k/n (k = 1..n, n = ``eval_capacity_buckets``) >= the most slots a row fills, with
        its outputs padded back to M (y 0, ok True, inner boundaries False). Chunks fill each row's front and
        the inner stage is causal over slots, so the real slots' outputs are those of the full run. (In
        training the derivative of the switch costs more than it saves: docs/benchmarks.md.)"""
        M = z_BxMxD.shape[1]
        n = self.cfg.eval_capacity_buckets if self.deterministic and self.s == 0 else 1
        sizes = sorted({-(-M * k // n) for k in range(1, n + 1)})
        if len(sizes) == 1:
            return self.inner(z_BxMxD, zseg_BxM, zpos_BxM)

        def run(S):
            def branch(inner, z, zseg, zpos):
                y, ok, stats = inner(z[:, :S], zseg[:, :S], zpos[:, :S])
                pad = lambda a, v: jnp.pad(a, [(0, 0), (0, M - S)] + [(0, 0)] * (a.ndim - 2),  # noqa: E731
                                           constant_values=v)
                return pad(y, 0), pad(ok, True), [dict(st, boundaries=pad(st["boundaries"], False)) for st in stats]
            return branch

        k = jnp.searchsorted(jnp.asarray(sizes), padded_tail_length(zseg_BxM))  # smallest size >= used
        return nnx.switch(k, [run(S) for S in sizes], self.inner, z_BxMxD, zseg_BxM, zpos_BxM)

    # ----- incremental decoding -----
    def init_cache(self, batch_size: int, max_len: int):
        if self.innermost:
            return {"main": self.main.init_cache(batch_size, max_len)}
        D = self.cfg.d_model[self.s]
        return {"encoder": self.encoder.init_cache(batch_size, max_len),
                "decoder": self.decoder.init_cache(batch_size, max_len),
                "inner": self.inner.init_cache(batch_size, max_len),
                "last_x": jnp.zeros((batch_size, D), jnp.float32),
                "last_z": jnp.zeros((batch_size, D), jnp.float32)}

    def step(self, x_BxD, cache, reset_B):
        """One position per row; the inner stage advances only in rows where this byte is a boundary."""
        x = self._pad(x_BxD)
        if self.innermost:
            y, main = self.main.step(x, cache["main"], reset_B)
            return self._truncate(y), {"main": main}
        xh, enc = self.encoder.step(x, cache["encoder"], reset_B)
        r = self.residual_proj(xh)
        p = jnp.where(reset_B, 1.0, self.router.probs(cache["last_x"], xh))
        b = p > 0.5
        zh, inner_new = self.inner.step(xh, cache["inner"], reset_B)
        inner = masked_update(inner_new, cache["inner"], b)
        P = jnp.clip(p, 1e-4, 1 - 1e-4)[:, None]
        zbar = jnp.where(b[:, None], P * zh + jnp.where(reset_B[:, None], 0.0, (1 - P) * cache["last_z"]),
                         cache["last_z"])
        y, dec = self.decoder.step(zbar + r, cache["decoder"], reset_B)
        return self._truncate(y), {"encoder": enc, "decoder": dec, "inner": inner, "last_x": xh, "last_z": zbar}


class HNetLM(ByteLM):
    """Embedding(256, D_0) -> HNetStage(0) -> lm_head; loss aux = α Σ_s ratio_loss_s."""

    def __init__(self, config: HNetConfig = HNetConfig(), *, dtype="float32", param_dtype="float32",
                 remat: bool | str = False, seed: int = 0):
        """``remat``: False, True or a ``jax.checkpoint_policies`` name (see ``hnet.layers.remat_policy``)."""
        rngs = nnx.Rngs(seed)
        self.config = config
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        D0 = config.d_model[0]
        self.embed = byte_embed(D0, param_dtype, rngs)
        self.backbone = HNetStage(config, 0, d_prev=None, n_res_offset=0, dtype=dtype, param_dtype=param_dtype,
                                  remat=remat, rngs=rngs)
        self.lm_head = lm_head(D0, dtype, param_dtype, rngs)

    def __call__(self, batch) -> ModelOutput:
        x = constrain(self.embed(batch["inputs"]).astype(jnp.float32), ("batch", "byte_len", "act_embed"))
        h, ok, stats = self.backbone(x, batch["segment_ids"], batch["positions"])
        logits = constrain(self.lm_head(h).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))
        aux = self.config.ratio_loss_weight * sum(st["ratio_loss"] for st in stats)
        metrics, boundaries = {}, {}
        bytes_per_chunk = 1.0
        for s, st in enumerate(stats):
            bytes_per_chunk = bytes_per_chunk * st["positions_per_chunk"]
            boundaries[f"s{s}"] = st["boundaries"]
            for k, v in st.items():
                if k != "boundaries":
                    metrics[f"{k}_s{s}"] = v
            metrics[f"bytes_per_chunk_s{s}"] = bytes_per_chunk
        return ModelOutput(logits_BxLxV=logits, aux_loss=aux, target_mask_BxL=ok, metrics=metrics,
                           boundaries=boundaries)

    def lr_multiplier(self, path: tuple[str, ...]) -> float:
        """Per-stage LR multiplier: a parameter's stage is the number of ``inner`` hops in its path."""
        return self.config.lr_multipliers()[sum(1 for k in path if k == "inner")]

    def init_cache(self, batch_size: int, max_len: int):
        return self.backbone.init_cache(batch_size, max_len)

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        h, cache = self.backbone.step(self.embed(tokens_B).astype(jnp.float32), cache, reset_B)
        return self.lm_head(h).astype(jnp.float32), cache
