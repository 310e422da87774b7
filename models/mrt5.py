"""MrT5 delete gates (Kallini et al., ICLR 2025; spec: shared/reference/boundaries.md §C, §9-10, traps 9-12),
causal decoder-only form (§10, a project proposal: not in the paper).

    h = encoder(embed(x))                                   l local causal layers (bytes)
    G = k · σ(−(w·RMSNorm(h) + b))  ∈ (k, 0)                k = −30, b₀ = +1; pads G = k; doc starts G = 0
    keep = G > k/2                                          START convention: kept bytes open chunks
    train (soft):  y = backbone(h, key_bias = G)            full length, every later layer biased by G
    eval  (hard):  y = expand-back(backbone(compact(h, keep, M), original positions))   M = L in eval;
                   benchmarks/mrt5_inference.py buckets M to the most kept bytes of a row (the speed-up)
    u_t = y[latest kept s ≤ t]                              select_start + broadcast (hard keep in both)
    logits = lm_head(decoder(h + u))
    loss += α·mean(G over non-pad) + β·mean_layers mean(max(s, 5) − 5)   (raw backbone scores)

α comes from a PI controller on the hard deleted fraction δ̂ (``PIController``): e = δ − δ̂,
P ← 0.9P + 0.1·k_p·e, I ← I + k_i·e, α = max(0, P + I) (paper; ``alpha_min = None``: unclipped, as the
causal config uses, see ``PIController`` for why), updated in every training forward once
``regularizer_delay`` steps have passed. Its state is a non-param ``PIState`` (TrainState.rest,
checkpointed). Minimising α·mean(G) pushes G → k (more deletion), so δ̂ < δ raises α: the rate rises.
``use_gate`` False gives the same model without deletion (the baseline of the BPB comparison).

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
from models.base import LN2, ByteLM, ModelOutput, configurable, cross_entropy_sums, dtype_from_name
from models.hnet import doc_starts


@configurable
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
    alpha_min: float | None = 0.0  # α = max(alpha_min, P + I); 0 = the paper, None = two-sided (see PIController)
    regularizer_delay: int = 0  # steps before the controller starts
    use_gate: bool = True  # False: the no-deletion baseline of the same model (G = 0, every byte kept)
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
    """G = k · σ(−(w·RMSNorm(h) + b)); w Xavier-uniform, b₀ = +1; G = k at pads, G = 0 at document starts.
    ``use_gate`` False (the no-deletion baseline): G = 0 at every real byte."""

    def __init__(self, cfg: MrT5Config, *, param_dtype, rngs: nnx.Rngs):
        self.k, self.enabled = cfg.gate_scale, cfg.use_gate
        self.norm = RMSNorm(cfg.d_model, param_dtype=param_dtype)
        self.proj = nnx.Linear(
            cfg.d_model, 1, use_bias=True, dtype=jnp.float32, param_dtype=param_dtype,
            kernel_init=param_init(nnx.initializers.xavier_uniform(), ("embed", None)),
            bias_init=param_init(nnx.initializers.constant(cfg.gate_bias_init), (None,)), rngs=rngs)

    def __call__(self, h_BxLxD, real_BxL, start_BxL):
        if not self.enabled:
            return jnp.where(real_BxL, 0.0, self.k)
        G = self.k * jax.nn.sigmoid(-self.proj(self.norm(h_BxLxD))[..., 0])
        return jnp.where(real_BxL, jnp.where(start_BxL, 0.0, G), self.k)


class PIState(nnx.Variable):
    """PI-controller state: not a parameter, carried in TrainState.rest and saved in checkpoints."""


class PIController(nnx.Module):
    """α for the gate loss, driven by the hard deleted fraction (MrT5 trainer).

    Why the paper's settings over-delete in the tiny causal runs (measured on tinyshakespeare, lr 3e-3):
    without any regulariser the task loss lowers δ̂ (0.33 → 0.10 by step 120: the backbone prefers to see
    every byte), so the rate must be held up by α > 0. But the deleted fraction responds to α with a gain
    far above the paper's (lr 3e-3 vs 1e-4, and the gradient of α·mean(G) reaches the whole local encoder
    through RMSNorm(h), not just w and b): with k_p = 0.5 the loop is unstable, δ̂ went 0.20 → 0.94 within
    10 steps of the regulariser delay. Deletion is then absorbing: a key at G ≈ k gets attention weight ~e^k
    and a saturated sigmoid, hence ~no task gradient, and α ≥ 0 cannot push back (δ̂ stayed at 0.90-0.99
    for the next 60 steps with α = 0). Two departures, both configurable (defaults = the paper):
      ``alpha_min = None``: α = P + I unclipped, so δ̂ > δ gives α < 0 and α·mean(G) pushes G → 0 (in a run
        with the paper's gains, and the gate's own LR × 0.1, this pulled δ̂ from 0.93 to 0.71 in 10 steps,
        then overshot to 0.00: still unstable);
      smaller k_p and larger k_i (configs/mrt5_causal_tiny.gin: 0.05, 1e-3): the linearised loop
        δ̂ ← δ̂ + g·α with this controller is stable for plant gains g from 0.3 to 10 per step (the range
        seen: ~0.25 pulling back, ~3.5 pushing), and the I term removes the P term's steady-state error.
    """

    def __init__(self, cfg: MrT5Config):
        self.target, self.kp, self.ki, self.delay = cfg.target_deletion, cfg.kp, cfg.ki, cfg.regularizer_delay
        self.alpha_min = cfg.alpha_min
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
        alpha = p + i if self.alpha_min is None else jnp.maximum(self.alpha_min, p + i)
        # new Variables rather than in-place writes: under the trainer's jax.grad the merged state's
        # variables belong to the outer trace and refuse mutation; the module itself is rebuilt inside it
        self.p = PIState(jnp.where(active, p, self.p[...]))
        self.i = PIState(jnp.where(active, i, self.i[...]))
        self.alpha = PIState(jnp.where(active, alpha, self.alpha[...]))
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


class MrT5CausalLM(ByteLM):
    """Causal decoder-only MrT5 (§10): local encoder -> delete gate -> backbone over kept bytes -> broadcast
    from the latest kept byte -> local decoder -> lm_head."""

    chunk_stage = "kept"  # the kept bytes are its chunks (compression and parity metrics)

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

    def encode(self, batch):
        """(h_BxLxD, G_BxL, keep_BxL): local encoder, delete gate and hard keep."""
        seg, pos = batch["segment_ids"], batch["positions"]
        real = seg > 0
        x = constrain(self.embed(batch["inputs"]).astype(jnp.float32), ("batch", "byte_len", "act_embed"))
        h = self.encoder(x, seg, pos)
        G = self.gate(h, real, doc_starts(seg))
        return h, G, (G > self.config.threshold) & real

    def soft_logits(self, h, G, keep, seg, pos):
        """Training form: full-length backbone with key bias G, read at the latest kept byte ≤ t."""
        y = self.backbone(h, seg, pos, G)
        return self._logits(h, chunking.expand(chunking.compact(y, keep, y.shape[1])[0], keep), seg, pos)

    def hard_logits(self, h, keep, seg, pos, M: int):
        """Inference form: the kept bytes compacted into M static slots (original positions for RoPE), the
        backbone run on them, expanded back. M must be ≥ the most kept bytes of a row (bytes past the M-th
        kept one would read u = 0); M = L is always safe, a smaller M is where the speed-up comes from."""
        z, _ = chunking.compact(h, keep, M)
        zseg, zpos = hard_gather(keep, M, seg, pos)  # original positions, not renumbered
        return self._logits(h, chunking.expand(self.backbone(z, zseg, zpos), keep), seg, pos)

    def _logits(self, h, u, seg, pos):
        out = self.decoder(h + u, seg, pos)
        return constrain(self.lm_head(out).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))

    def __call__(self, batch) -> ModelOutput:
        seg, pos = batch["segment_ids"], batch["positions"]
        h, G, keep = self.encode(batch)
        metrics = {}
        if self.deterministic:  # hard first: the score regulariser metric is the soft forward's, as in training
            logits = self.hard_logits(h, keep, seg, pos, h.shape[1])
            soft = self.soft_logits(h, G, keep, seg, pos)
            metrics.update(loss_metrics("hard", logits, None, batch), **loss_metrics("soft", soft, None, batch))
        else:
            logits = self.soft_logits(h, G, keep, seg, pos)
        aux, gm = gate_losses(self.config, self.controller, G, keep, seg > 0, score_regs(self.backbone),
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

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
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
