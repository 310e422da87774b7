"""MrT5 delete gates (Kallini et al., ICLR 2025; spec: shared/reference/boundaries.md §C, §9-10, traps 9-12),
causal decoder-only form (§10, a project proposal: not in the paper).

    h = encoder(embed(x))                                   l local causal layers (bytes)
    G = k · σ(−(w·RMSNorm(h) + b))  ∈ (k, 0)                k = −30, b₀ = +1; pads G = k; doc starts G = 0
    keep = G > k/2                                          START convention: kept bytes open chunks
    train (soft):  y = backbone(h, key_bias = G)            full length, every later layer biased by G
    eval  (hard):  y = expand-back(backbone(compact(h, keep, L), original positions))
    u_t = y[latest kept s ≤ t]                              select_start + broadcast (hard keep in both)
    logits = lm_head(decoder(h + u))
    loss += α·mean(G over non-pad) + β·mean_layers mean(max(s, 5) − 5)   (raw backbone scores)

α comes from a PI controller on the hard deleted fraction δ̂ (``PIController``): e = δ − δ̂,
P ← 0.9P + 0.1·k_p·e, I ← I + k_i·e, α = max(0, P + I), updated in every training forward once
``regularizer_delay`` steps have passed. Its state is a non-param ``PIState`` (TrainState.rest,
checkpointed). Minimising α·mean(G) pushes G → k (more deletion), so δ̂ < δ raises α: the rate rises.

In eval mode (``model.eval()``) the logits are the hard ones; the soft forward is run too and its loss
reported in the metrics (``soft_ce``/``soft_bpb`` next to ``hard_ce``/``hard_bpb``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.bytes import VOCAB_SIZE
from hnet.layers import RMSNorm, Stack, StackConfig, normal
from hnet.sharding import constrain, param_init
from models.base import ModelOutput, dtype_from_name
from models.hnet import doc_starts
from train.step import LN2, cross_entropy_sums


@dataclasses.dataclass(frozen=True)
class MrT5Config:
    """Layouts: ``encoder_layout`` = the l layers before the gate, ``backbone_layout`` = the layers after it
    (biased / shortened), ``decoder_layout`` = the local byte decoder (causal LM) or the ByT5 decoder
    depth as 'T<n>' (encoder-decoder)."""

    d_model: int = 128
    d_ff: int = 384
    num_heads: int = 4
    rotary_dim: int | None = None  # None = full head dim
    encoder_layout: str = "T3"
    backbone_layout: str = "T6"
    decoder_layout: str = "T2"
    gate_scale: float = -30.0  # k (sigmoid_mask_scale)
    gate_bias_init: float = 1.0  # b₀ = +1: keep-leaning start
    softmax1: bool = True
    score_reg_weight: float = 0.5  # β (0.5 from scratch)
    score_margin: float = 5.0
    target_deletion: float = 0.5  # δ
    kp: float = 0.5
    ki: float = 1e-5
    alpha_init: float = 0.0
    regularizer_delay: int = 0  # steps before the controller starts
    # encoder-decoder span corruption (models/mrt5_encdec.py)
    noise_density: float = 0.15
    mean_span_length: int = 3
    target_capacity: float = 0.5  # decoder length / L
    corruption_seed: int = 0

    @property
    def threshold(self) -> float:
        return self.gate_scale / 2.0

    def stack_config(self, layout: str, *, causal: bool = True, score: bool = False) -> StackConfig:
        return StackConfig(layout=layout, d_model=self.d_model, d_ff=self.d_ff, num_heads=self.num_heads,
                           rotary_dim=self.rotary_dim, softmax1=self.softmax1,
                           score_margin=self.score_margin if score else None, causal=causal)


class DeleteGate(nnx.Module):
    """G = k · σ(−(w·RMSNorm(h) + b)); w Xavier-uniform, b₀ = +1; G = k at pads, G = 0 at document starts."""

    def __init__(self, cfg: MrT5Config, *, param_dtype, rngs: nnx.Rngs):
        self.k = cfg.gate_scale
        self.norm = RMSNorm(cfg.d_model, param_dtype=param_dtype)
        self.proj = nnx.Linear(
            cfg.d_model, 1, use_bias=True, dtype=jnp.float32, param_dtype=param_dtype,
            kernel_init=param_init(nnx.initializers.xavier_uniform(), ("embed", None)),
            bias_init=param_init(nnx.initializers.constant(cfg.gate_bias_init), (None,)), rngs=rngs)

    def __call__(self, h_BxLxD, real_BxL, start_BxL):
        G = self.k * jax.nn.sigmoid(-self.proj(self.norm(h_BxLxD))[..., 0])
        return jnp.where(real_BxL, jnp.where(start_BxL, 0.0, G), self.k)


class PIState(nnx.Variable):
    """PI-controller state: not a parameter, carried in TrainState.rest and saved in checkpoints."""


class PIController(nnx.Module):
    """α for the gate loss, driven by the hard deleted fraction (MrT5 trainer)."""

    def __init__(self, cfg: MrT5Config):
        self.target, self.kp, self.ki, self.delay = cfg.target_deletion, cfg.kp, cfg.ki, cfg.regularizer_delay
        self.p = PIState(jnp.zeros((), jnp.float32))
        self.i = PIState(jnp.zeros((), jnp.float32))
        self.alpha = PIState(jnp.full((), cfg.alpha_init, jnp.float32))
        self.step = PIState(jnp.zeros((), jnp.int32))

    def update(self, deleted_fraction):
        """One controller step on δ̂ (no gradient); inactive (only counting) before ``delay`` steps."""
        e = self.target - jax.lax.stop_gradient(deleted_fraction).astype(jnp.float32)
        active = self.step[...] >= self.delay
        p = 0.9 * self.p[...] + 0.1 * self.kp * e
        i = self.i[...] + self.ki * e
        # new Variables rather than in-place writes: under the trainer's jax.grad the merged state's
        # variables belong to the outer trace and refuse mutation; the module itself is rebuilt inside it
        self.p = PIState(jnp.where(active, p, self.p[...]))
        self.i = PIState(jnp.where(active, i, self.i[...]))
        self.alpha = PIState(jnp.where(active, jnp.maximum(0.0, p + i), self.alpha[...]))
        self.step = PIState(self.step[...] + 1)


def gate_losses(cfg: MrT5Config, controller: PIController, G_BxL, keep_BxL, real_BxL, score_regs, *,
                training: bool):
    """(aux loss, metrics): α·mean(G) + β·mean(score regs); updates the controller when ``training``
    (the loss uses α before this step's update, as the reference trainer)."""
    n = jnp.maximum(jnp.sum(real_BxL), 1)
    gate_mean = jnp.sum(G_BxL * real_BxL) / n
    deleted = jnp.sum(real_BxL & ~keep_BxL) / n
    alpha = controller.alpha[...]
    score_reg = sum(score_regs) / max(len(score_regs), 1)
    aux = alpha * gate_mean + cfg.score_reg_weight * score_reg
    if training:
        controller.update(deleted)
    kept_B = jnp.sum(keep_BxL & real_BxL, axis=1)
    metrics = {"gate_loss": gate_mean, "score_reg": jnp.asarray(score_reg, jnp.float32), "deletion_rate": deleted,
               "deletion_target": jnp.asarray(cfg.target_deletion, jnp.float32), "alpha": alpha,
               "pi_p": controller.p[...], "pi_i": controller.i[...],
               "backbone_len": jnp.mean(kept_B.astype(jnp.float32)),
               "bytes_per_kept": jnp.sum(real_BxL) / jnp.maximum(jnp.sum(kept_B), 1)}
    return aux, metrics


def score_regs(stack: Stack) -> list[jax.Array]:
    """The score regularisers the stack's attention layers recorded in their last full forward."""
    return [b.mixer.score_reg[...] for b in stack.blocks
            if b.kind == "t" and getattr(b.mixer, "score_reg", None) is not None]


def loss_metrics(prefix: str, logits_BxLxV, target_mask_BxL, batch) -> dict[str, jax.Array]:
    """{prefix}_ce and {prefix}_bpb of one set of logits on the batch (when it carries targets)."""
    if "targets" not in batch:
        return {}
    s = cross_entropy_sums(ModelOutput(logits_BxLxV, target_mask_BxL=target_mask_BxL), batch)
    return {f"{prefix}_ce": s["nll_sum"] / jnp.maximum(s["n_targets"], 1.0),
            f"{prefix}_bpb": s["byte_nll_sum"] / (LN2 * jnp.maximum(s["n_bytes"], 1.0))}


def hard_gather(keep_BxL, M: int, *values_BxL):
    """compact each int [B, L] array at the kept positions into M slots; invalid slots -> 0."""
    out = []
    for v in values_BxL:
        z, valid = chunking.compact(v[..., None].astype(jnp.float32), keep_BxL, M, impl="jnp")
        out.append(jnp.where(valid, z[..., 0].astype(jnp.int32), 0))
    return out


class MrT5CausalLM(nnx.Module):
    """Causal decoder-only MrT5 (§10): local encoder -> delete gate -> backbone over kept bytes -> broadcast
    from the latest kept byte -> local decoder -> lm_head."""

    def __init__(self, config: MrT5Config = MrT5Config(), *, dtype="float32", param_dtype="float32",
                 remat: bool = False, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.config = config
        self.deterministic = False
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        D = config.d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.embed = nnx.Embed(VOCAB_SIZE, D, param_dtype=param_dtype,
                               embedding_init=param_init(normal(1.0), ("vocab", "embed")), rngs=rngs)
        self.encoder = Stack(config.stack_config(config.encoder_layout), **kw)
        self.gate = DeleteGate(config, param_dtype=param_dtype, rngs=rngs)
        self.backbone = Stack(config.stack_config(config.backbone_layout, score=True), **kw)
        self.decoder = Stack(config.stack_config(config.decoder_layout), **kw)
        self.lm_head = nnx.Linear(D, VOCAB_SIZE, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                  kernel_init=param_init(normal(0.02), ("embed", "vocab")), rngs=rngs)
        self.controller = PIController(config)

    def _upsample_soft(self, h, G, keep, seg, pos):
        y = self.backbone(h, seg, pos, G)
        return chunking.expand(chunking.compact(y, keep, y.shape[1])[0], keep)

    def _upsample_hard(self, h, keep, seg, pos):
        z, _ = chunking.compact(h, keep, h.shape[1])
        zseg, zpos = hard_gather(keep, h.shape[1], seg, pos)  # original positions, not renumbered
        return chunking.expand(self.backbone(z, zseg, zpos), keep)

    def _logits(self, h, u, seg, pos):
        out = self.decoder(h + u, seg, pos)
        return constrain(self.lm_head(out).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))

    def __call__(self, batch) -> ModelOutput:
        cfg = self.config
        seg, pos = batch["segment_ids"], batch["positions"]
        real = seg > 0
        x = constrain(self.embed(batch["inputs"]).astype(jnp.float32), ("batch", "byte_len", "act_embed"))
        h = self.encoder(x, seg, pos)
        G = self.gate(h, real, doc_starts(seg))
        keep = (G > cfg.threshold) & real
        metrics = {}
        if self.deterministic:
            logits = self._logits(h, self._upsample_hard(h, keep, seg, pos), seg, pos)
            soft = self._logits(h, self._upsample_soft(h, G, keep, seg, pos), seg, pos)
            metrics.update(loss_metrics("hard", logits, None, batch), **loss_metrics("soft", soft, None, batch))
        else:
            logits = self._logits(h, self._upsample_soft(h, G, keep, seg, pos), seg, pos)
        aux, gm = gate_losses(cfg, self.controller, G, keep, real, score_regs(self.backbone),
                              training=not self.deterministic)
        return ModelOutput(logits_BxLxV=logits, aux_loss=aux, metrics={**gm, **metrics},
                           boundaries={"kept": keep})

    # ----- incremental decoding (hard deletion: the backbone advances only at kept bytes) -----
    def init_cache(self, batch_size: int, max_len: int):
        return {"encoder": self.encoder.init_cache(batch_size, max_len),
                "backbone": self.backbone.init_cache(batch_size, max_len),
                "decoder": self.decoder.init_cache(batch_size, max_len),
                "u": jnp.zeros((batch_size, self.config.d_model), jnp.float32),
                "pos": jnp.zeros((batch_size,), jnp.int32)}

    def decode_step(self, tokens_B, cache, reset_B):
        pos = jnp.where(reset_B, 0, cache["pos"] + 1)
        h, enc = self.encoder.step(self.embed(tokens_B).astype(jnp.float32), cache["encoder"], reset_B)
        G = self.gate(h[:, None], jnp.ones_like(reset_B)[:, None], reset_B[:, None])[:, 0]
        keep = (G > self.config.threshold) | reset_B
        y, bb = self.backbone.step(h, cache["backbone"], reset_B, pos)
        bb = jax.tree.map(lambda n, o: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                          bb, cache["backbone"])
        u = jnp.where(keep[:, None], y, cache["u"])
        out, dec = self.decoder.step(h + u, cache["decoder"], reset_B)
        return (self.lm_head(out).astype(jnp.float32),
                {"encoder": enc, "backbone": bb, "decoder": dec, "u": u, "pos": pos})
