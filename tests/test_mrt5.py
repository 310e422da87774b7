"""MrT5 delete gates (models/mrt5.py, models/mrt5_encdec.py, models/common.py): gate formula and threshold, soft
deletion as key masking, softmax1, hard = soft when gates saturate (original RoPE positions), the PI controller
(hand example, direction, checkpoint round trip), causality and decode_step of the causal form, span corruption,
gradients, and the tiny configs training a few steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import doc_starts, offsets_since_start
from hnet.layers import Attention
from hnet.sharding import mesh_context
from models.common import DeleteGate, MrT5Config, PIController, PIState
from models.mrt5 import MrT5CausalLM
from models.mrt5_encdec import SENTINEL_FIRST, MrT5EncDec, span_corruption
from tests.helpers import packed_row, pydoc_bytes, stack_rows, text_row, to_jnp
from train.step import cross_entropy_sums

jax.config.update("jax_default_matmul_precision", "highest")

L = 48
K = -30.0
TINY = dict(d_model=32, d_ff=64, num_heads=2, encoder_layout="T1", backbone_layout="T1", decoder_layout="T1")


def with_targets(batch):
    seg = batch["segment_ids"]
    B = seg.shape[0]
    out = dict(batch)
    out["targets"] = np.concatenate([batch["inputs"][:, 1:], np.zeros((B, 1), np.int32)], 1)
    out["loss_mask"] = np.concatenate([(seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]), np.zeros((B, 1), bool)], 1)
    out["byte_mask"] = out["loss_mask"] & (out["targets"] < 254)
    return out


def real_batch(n_rows=2):
    rows = [packed_row([pydoc_bytes("assignment", 20, offset=100), pydoc_bytes("lambda", 20)], L),
            packed_row([pydoc_bytes("pass", 44, offset=50)], L),
            packed_row([pydoc_bytes("await", 30, offset=10)], L)]
    return with_targets(stack_rows(rows[:n_rows]))


def saturate_gate(model, scale=1e5):
    """w·RMSNorm(h) scaled up, b = 0: G is within ~0 of {0, k} at almost every position (a kept/deleted mix)."""
    model.gate.proj.kernel[...] = model.gate.proj.kernel[...] * scale
    model.gate.proj.bias[...] = jnp.zeros_like(model.gate.proj.bias[...])


@functools.lru_cache(maxsize=None)
def causal_model(bias_init: float = 0.0, **kw):
    """b₀ = 0: about half of the bytes deleted at init, so causality and decoding see deletions."""
    return MrT5CausalLM(MrT5Config(**TINY, gate_bias_init=bias_init, **kw), seed=1)


@functools.lru_cache(maxsize=None)
def _jitted(graphdef, eval_mode: bool):
    @jax.jit
    def fwd(state, batch):
        m = nnx.merge(graphdef, state)
        if eval_mode:
            m.eval()
        out = m(batch)
        return out, nnx.state(m)

    return fwd


def apply(model, batch, eval_mode: bool = False):
    """Jitted ``model(batch)`` (train or eval mode); the model's non-param state is updated like the trainer's."""
    graphdef, state = nnx.split(model)
    out, new = _jitted(graphdef, eval_mode)(state, to_jnp(batch))
    nnx.update(model, new)
    return out


# ------------------------------------------------------------------------------------------ gate


def test_gate_formula_threshold_pads_and_doc_starts():
    cfg = MrT5Config(**TINY)
    gate = DeleteGate(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert float(gate.proj.bias[...][0]) == 1.0  # b₀ = +1 (keep-leaning)
    h = jax.random.normal(jax.random.key(0), (2, 12, cfg.d_model)) * 3
    seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [3] * 12])
    G = np.asarray(gate(h, seg > 0, doc_starts(seg)))
    n = np.asarray(gate.norm(h))
    z = n @ np.asarray(gate.proj.kernel[...])[:, 0] + 1.0
    expect = K / (1 + np.exp(z))  # k·σ(−z)
    real = np.asarray(seg > 0)
    starts = np.zeros_like(real)
    starts[0, [0, 5]] = starts[1, 0] = True
    np.testing.assert_allclose(G[real & ~starts], expect[real & ~starts], rtol=1e-5)
    assert (G[~real] == K).all() and (G[starts] == 0).all()
    assert ((G[real] > K) & (G[real] <= 0)).all()
    # threshold k/2 = -15: G > -15 <=> z > 0 (σ(−z) < 1/2)
    keep = G > cfg.threshold
    np.testing.assert_array_equal(keep[real & ~starts], (z > 0)[real & ~starts])
    assert cfg.threshold == -15.0


# ------------------------------------------------------------------------------------- attention


def _qkv(B=2, S=10, H=2, D=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, S, H, D)) for k in ks]


def test_soft_deletion_with_k_equals_masking_the_key():
    attn = Attention(16, 2, rngs=nnx.Rngs(0))
    q, k, v = _qkv()
    causal = jnp.tril(jnp.ones((10, 10), bool))[None, None]
    deleted = jnp.array([[0, 1, 0, 1, 1, 0, 0, 1, 0, 0]] * 2, bool)
    soft = attn._attend(q, k, v, causal, jnp.where(deleted, K, 0.0))
    masked = attn._attend(q, k, v, causal & ~deleted[:, None, None, :])
    np.testing.assert_allclose(soft, masked, atol=1e-6)
    assert np.abs(attn._attend(q, k, v, causal) - masked).max() > 1e-2  # the comparison can fail


def test_softmax1_is_a_zero_logit_zero_value_sink():
    a1 = Attention(16, 2, softmax1=True, rngs=nnx.Rngs(0))
    q, k, v = _qkv()
    mask = jnp.tril(jnp.ones((10, 10), bool))[None, None]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    e = np.where(np.asarray(mask), np.exp(s), 0.0)
    expect = np.einsum("bhqk,bkhd->bqhd", e / (1.0 + e.sum(-1, keepdims=True)), v)
    np.testing.assert_allclose(a1._attend(q, k, v, mask), expect, atol=1e-5)


def test_score_regulariser_records_excess_scores():
    attn = Attention(16, 2, score_margin=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 10, 16)) * 30
    seg, pos = jnp.ones((2, 10), jnp.int32), jnp.broadcast_to(jnp.arange(10), (2, 10))
    attn(x, seg, pos)
    q, k, _ = attn.qkv(x, pos)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    mask = np.broadcast_to(np.tril(np.ones((10, 10), bool)), s.shape)
    expect = (np.maximum(s, 0.5) - 0.5)[mask].mean()
    assert expect > 0
    np.testing.assert_allclose(float(attn.score_reg[...]), expect, rtol=1e-4)


# ------------------------------------------------------------------------------------ controller


def test_pi_controller_hand_example_and_direction():
    c = PIController(MrT5Config(target_deletion=0.5, kp=0.5, ki=0.1, alpha_init=0.0, regularizer_delay=1))
    c.update(jnp.asarray(0.2))  # step 0 < delay: only counts
    assert int(c.step[...]) == 1 and float(c.alpha[...]) == 0.0 and float(c.p[...]) == 0.0
    c.update(jnp.asarray(0.2))  # e = 0.3: P = 0.1·0.5·0.3, I = 0.1·0.3 -> α rises (deleting too little)
    np.testing.assert_allclose([c.p[...], c.i[...], c.alpha[...]], [0.015, 0.03, 0.045], rtol=1e-6)
    c.update(jnp.asarray(0.9))  # e = -0.4: P = 0.0135 - 0.02, I = 0.03 - 0.04 -> α clipped at 0
    np.testing.assert_allclose([c.p[...], c.i[...], c.alpha[...]], [-0.0065, -0.01, 0.0], rtol=1e-5, atol=1e-7)
    assert int(c.step[...]) == 3 and isinstance(c.alpha, PIState)


def test_pi_controller_two_sided_goes_negative_when_deleting_too_much():
    c = PIController(MrT5Config(target_deletion=0.5, kp=0.5, ki=0.1, alpha_min=None))
    c.update(jnp.asarray(0.9))  # e = -0.4: P = -0.02, I = -0.04 -> α = -0.06 (the paper's clip would give 0)
    np.testing.assert_allclose([c.p[...], c.i[...], c.alpha[...]], [-0.02, -0.04, -0.06], rtol=1e-6)
    c.update(jnp.asarray(0.1))  # e = +0.4: P = -0.018 + 0.02, I = 0 -> α = 0.002 > 0 again
    np.testing.assert_allclose([c.p[...], c.i[...], c.alpha[...]], [0.002, 0.0, 0.002], rtol=1e-5, atol=1e-7)


def _closed_loop(cfg: MrT5Config, steps: int, keep_pull: float = 0.02, lr: float = 3e-3) -> np.ndarray:
    """δ̂ per step of a real DeleteGate behind a linear 'encoder' (the gate loss reaches the encoder too),
    trained by Adam on (α − keep_pull)·mean(G) with α from the controller: keep_pull stands for the task
    loss, which on its own lowers the deleted fraction (measured: 0.33 → 0.10 with α = 0)."""
    D = cfg.d_model

    class Toy(nnx.Module):
        def __init__(self):
            self.enc = nnx.Linear(D, D, rngs=nnx.Rngs(1))
            self.gate = DeleteGate(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    graphdef, params = nnx.split(Toy(), nnx.Param)
    ctrl = PIController(cfg)
    x_BxLxD = jax.random.normal(jax.random.key(2), (8, 64, D))
    real, start = jnp.ones((8, 64), bool), jnp.zeros((8, 64), bool)
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt, alpha):
        def loss(p):
            m = nnx.merge(graphdef, p)
            G = m.gate(m.enc(x_BxLxD), real, start)
            return (alpha - keep_pull) * jnp.mean(G), jnp.mean(G < cfg.threshold)

        (_, deleted), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, deleted

    opt, out = tx.init(params), []
    for _ in range(steps):
        params, opt, deleted = step(params, opt, ctrl.alpha[...])
        ctrl.update(deleted)
        out.append(float(deleted))
    return np.asarray(out)


def test_causal_config_controller_holds_the_target_in_a_closed_loop(gin_clean):
    """The causal config's gains (two-sided, k_p 0.05, k_i 1e-3) bring δ̂ to the target against a task force
    that favours keeping; the paper's gains (k_p 0.5, k_i 1e-5) settle below it (P-only steady-state
    error), so the test can fail."""
    from train.config import parse
    import gin

    parse(["configs/mrt5_causal_tiny.gin", "configs/runs/default.gin"], [])
    gains = {k: gin.query_parameter(f"models.MrT5Config.{k}") for k in ("kp", "ki", "alpha_min", "target_deletion")}
    tiny = dict(d_model=32, regularizer_delay=20)
    d = _closed_loop(MrT5Config(**tiny, **gains), 240)
    assert abs(d[-40:].mean() - gains["target_deletion"]) < 0.02 and np.abs(d[-40:] - 0.5).max() < 0.03, d[::20]
    paper = _closed_loop(MrT5Config(**tiny, kp=0.5, ki=1e-5, target_deletion=gains["target_deletion"]), 240)
    assert gains["target_deletion"] - paper[-40:].mean() > 0.025, paper[::20]


# -------------------------------------------------------------------------------- causal model


def test_hard_equals_soft_when_gates_saturate_and_positions_are_original(cpu_mesh):
    model = MrT5CausalLM(MrT5Config(**TINY, kp=0.5, regularizer_delay=0), seed=2)
    saturate_gate(model)
    batch = to_jnp(real_batch(3))
    with mesh_context(cpu_mesh):
        train_out = apply(model, batch)
        # a training forward steps the controller on the hard deleted fraction; an eval forward does not
        e = 0.5 - float(train_out.metrics["deletion_rate"])
        np.testing.assert_allclose(float(model.controller.p[...]), 0.05 * e, rtol=1e-5)
        out = apply(model, batch, eval_mode=True)
        assert int(model.controller.step[...]) == 1
    soft = train_out.logits_BxLxV
    hard, m = out.logits_BxLxV, out.metrics
    real = np.asarray(batch["segment_ids"] > 0)
    kept = np.asarray(out.boundaries["kept"])
    assert 0.2 < 1 - kept[real].mean() < 0.8  # a real mix of kept and deleted bytes
    np.testing.assert_allclose(np.asarray(hard)[real], np.asarray(soft)[real], atol=1e-4)
    np.testing.assert_allclose(float(m["hard_ce"]), float(m["soft_ce"]), rtol=1e-5)
    # hard deletion gathers the ORIGINAL positions ...
    keep = jnp.asarray(kept)
    _, zpos = chunking.compact_ids(keep, L, batch["segment_ids"], batch["positions"])
    for b in range(3):
        idx = np.nonzero(kept[b])[0]
        np.testing.assert_array_equal(np.asarray(zpos)[b, :len(idx)], np.asarray(batch["positions"])[b, idx])
    # ... and the backbone needs them: with renumbered positions it no longer matches the soft backbone
    graphdef, state = nnx.split(model)

    @jax.jit
    def backbones(state, batch, keep):
        m = nnx.merge(graphdef, state)
        seg, pos = batch["segment_ids"], batch["positions"]
        h = m.encoder(m.embed(batch["inputs"]), seg, pos)
        soft = m.backbone(h, seg, pos, m.gate(h, seg > 0, doc_starts(seg)))
        z = chunking.compact(h, keep, L)[0]
        zseg, zpos = chunking.compact_ids(keep, L, seg, pos)
        return (chunking.compact(soft, keep, L)[0], m.backbone(z, zseg, zpos),
                m.backbone(z, zseg, offsets_since_start(doc_starts(zseg))), zseg)

    with mesh_context(cpu_mesh):
        y_soft, y_orig, y_renum, zseg = map(np.asarray, backbones(state, batch, keep))
    valid = zseg > 0
    err_orig = np.abs(y_orig - y_soft)[valid].max()
    err_renum = np.abs(y_renum - y_soft)[valid].max()
    assert err_renum > 10 * err_orig, (err_orig, err_renum)


B_ROWS = 6  # one compiled [B_ROWS, L] shape for the prefix and decoding tests


def _pad_rows(rows, n):
    rows = [{k: np.pad(v, (0, L - len(v))) for k, v in r.items()} for r in rows]
    return rows + [{k: np.zeros(L, np.int32) for k in rows[0]}] * (n - len(rows))


@pytest.mark.parametrize("eval_mode", [False, True])
def test_causal_prefix(eval_mode, cpu_mesh):
    model = causal_model()
    base = pydoc_bytes("assignment", L, offset=300)
    ts = [0, 5, 17, 30, L - 2]
    rows = [text_row(base)] + [text_row(base[:t + 1]) for t in ts]
    with mesh_context(cpu_mesh):
        out = apply(model, stack_rows(_pad_rows(rows, B_ROWS)), eval_mode)
    logits = np.asarray(out.logits_BxLxV)
    assert 0.2 < float(out.metrics["deletion_rate"]) < 0.8
    for r, t in enumerate(ts, start=1):
        np.testing.assert_allclose(logits[r, :t + 1], logits[0, :t + 1], atol=1e-5, err_msg=f"prefix {t}")
    # a different continuation changes later logits (the test can fail)
    other = text_row(base[:20] + pydoc_bytes("lambda", L - 20, offset=40))
    with mesh_context(cpu_mesh):
        lo = np.asarray(apply(model, stack_rows(_pad_rows([other] + rows[1:], B_ROWS)), eval_mode).logits_BxLxV)
    assert np.abs(lo[0, 21:] - logits[0, 21:]).max() > 1e-3


def test_decode_step_matches_hard_forward(cpu_mesh):
    model = causal_model()
    T = L
    rows = [packed_row([pydoc_bytes("assignment", T - 2)], T),
            packed_row([pydoc_bytes("lambda", 25, offset=300)], T),
            packed_row([pydoc_bytes("pass", 13), pydoc_bytes("await", T - 17)], T)]
    batch = stack_rows(_pad_rows(rows, B_ROWS))
    with mesh_context(cpu_mesh):
        out = apply(model, batch, eval_mode=True)
        full, bnd = out.logits_BxLxV, out.boundaries
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, tok, cache, reset):
            m = nnx.merge(graphdef, state)
            m.eval()
            return m.decode_step(tok, cache, reset)

        cache = jax.jit(lambda s: nnx.merge(graphdef, s).init_cache(B_ROWS, T))(state)
        reset = batch["positions"] == 0
        out = []
        for t in range(T):
            lg, cache = step(state, jnp.asarray(batch["inputs"][:, t]), cache, jnp.asarray(reset[:, t]))
            out.append(np.asarray(lg))
    inc = np.stack(out, 1)
    real = batch["segment_ids"] > 0
    kept = np.asarray(bnd["kept"])[:, :T]
    assert 0.2 < 1 - kept[real].mean() < 0.8
    np.testing.assert_allclose(inc[real], np.asarray(full)[:, :T][real], atol=1e-4)


def _grad_check(model, batch, alpha: float = 100.0):
    """Every parameter gets a finite non-zero gradient of CE + aux. |α| is large, so the gate bias gradient is
    dominated by α·mean(G): its sign is α's (α > 0: descent lowers b, i.e. pushes G towards k = more deletion;
    α < 0, the two-sided controller: descent raises b = more keeping)."""
    model.controller.alpha[...] = jnp.asarray(alpha)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(batch)
        s = cross_entropy_sums(out, batch)
        return s["nll_sum"] / s["n_targets"] + out.aux_loss

    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(val))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(jax.tree.leaves(params)) >= 10
    for path, g in flat:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
    assert np.sign(float(grads["gate"]["proj"]["bias"][...][0])) == np.sign(alpha)


@pytest.mark.parametrize("alpha", [100.0, -100.0])
def test_gradients_reach_every_parameter_causal(alpha, cpu_mesh):
    with mesh_context(cpu_mesh):
        _grad_check(MrT5CausalLM(MrT5Config(**TINY), seed=3), to_jnp(real_batch()), alpha)


def test_hard_capacity_below_L_and_no_gate_baseline(cpu_mesh):
    """hard_logits with M slots (≥ the most kept bytes of a row) equals M = L: what the inference benchmark
    runs; too small an M changes the logits (the test can fail). use_gate False keeps every byte, G = 0."""
    model = causal_model()
    batch = to_jnp(real_batch(3))
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=2)
    def hard(state, batch, M):
        m = nnx.merge(graphdef, state)
        h, G, keep = m.encode(batch)
        return m.hard_logits(h, keep, batch["segment_ids"], batch["positions"], M), keep

    with mesh_context(cpu_mesh):
        full, keep = hard(state, batch, L)
        n_max = int(np.asarray(keep).sum(1).max())
        assert n_max < L - 8
        small, _ = hard(state, batch, n_max)
        tight, _ = hard(state, batch, n_max - 4)
        off = MrT5CausalLM(MrT5Config(**TINY, use_gate=False), seed=1)
        out = apply(off, batch, eval_mode=True)
    real = np.asarray(batch["segment_ids"] > 0)
    np.testing.assert_allclose(np.asarray(small)[real], np.asarray(full)[real], atol=1e-5)
    assert np.abs(np.asarray(tight) - np.asarray(full))[real].max() > 1e-3
    assert float(out.metrics["deletion_rate"]) == 0.0 and np.asarray(out.boundaries["kept"])[real].all()
    np.testing.assert_allclose(float(out.metrics["hard_ce"]), float(out.metrics["soft_ce"]), rtol=1e-5)


# --------------------------------------------------------------------------- encoder-decoder


def test_span_corruption_reconstructs_the_text():
    batch = real_batch(3)
    c = jax.tree.map(np.asarray, span_corruption(jax.random.key(4), to_jnp(batch), 0.15, 3, L))
    for b in range(3):
        for s in np.unique(batch["segment_ids"][b][batch["segment_ids"][b] > 0]):
            orig = batch["inputs"][b][batch["segment_ids"][b] == s]
            enc = c["enc_tok"][b][c["enc_seg"][b] == s]
            tgt = c["dec_tgt"][b][c["dec_seg"][b] == s]
            assert enc[0] == orig[0]  # a document's first byte is never corrupted
            spans, cur = {}, None  # sentinel position in tgt -> bytes
            for tok in tgt:
                if tok >= SENTINEL_FIRST and tok < SENTINEL_FIRST + 9 and (cur is None or spans[cur]):
                    cur = len(spans)
                    spans[cur] = []
                else:
                    spans[cur].append(int(tok))
            rebuilt, k = [], 0
            for tok in enc:
                if SENTINEL_FIRST <= tok < SENTINEL_FIRST + 9:
                    rebuilt += spans[k]
                    k += 1
                else:
                    rebuilt.append(int(tok))
            np.testing.assert_array_equal(rebuilt, orig)
    assert 0.05 < c["noise"].sum() / (batch["segment_ids"] > 0).sum() < 0.3
    # logits[t] are read at the decoder slot that predicts x_{t+1} = targets[t]
    ok = c["target_ok"]
    got = np.take_along_axis(c["dec_tgt"], c["target_slot"], 1)
    assert ok.sum() > 5
    np.testing.assert_array_equal(got[ok], batch["targets"][ok])
    # the decoder input is the target shifted right within each document
    same = c["dec_seg"][:, 1:] == c["dec_seg"][:, :-1]
    np.testing.assert_array_equal(c["dec_in"][:, 1:][same], c["dec_tgt"][:, :-1][same])


def test_encdec_hard_equals_soft_when_saturated_and_gradients(cpu_mesh):
    model = MrT5EncDec(MrT5Config(**TINY), seed=5)
    with mesh_context(cpu_mesh):
        _grad_check(model, to_jnp(real_batch()))
        saturate_gate(model)
        m = apply(model, real_batch(3), eval_mode=True).metrics
    assert 0.2 < float(m["deletion_rate"]) < 0.8
    np.testing.assert_allclose(float(m["hard_ce"]), float(m["soft_ce"]), rtol=1e-5)
    assert float(m["hard_ce"]) > 1.0


def test_multilingual_eval_counts_the_kept_positions_as_chunks(tmp_path, cpu_mesh):
    """train.multilingual_eval counts MrT5's chunks at its kept positions (boundaries['kept']), not one per byte:
    about half the bytes are deleted at this initialisation."""
    import dataclasses as dc

    from train import data as data_lib
    from train.eval import evaluate_languages
    from train.loop import build_state
    from train.optim import OptimizerConfig

    texts = {"eng": pydoc_bytes("assignment", 300), "deu": pydoc_bytes("lambda", 300)}
    for lang, text in texts.items():
        (tmp_path / f"{lang}.txt").write_bytes(text)
    model = causal_model()
    setup = build_state(lambda: model, OptimizerConfig(), 10, cpu_mesh)
    eval_cfg = dc.replace(data_lib.DataConfig(), seq_len=64, batch_size=4)
    res = evaluate_languages(setup, eval_cfg, str(tmp_path))["languages"]
    for lang, text in texts.items():
        cfg = dc.replace(eval_cfg, sources=(str(tmp_path / f"{lang}.txt"),), byte_range=(0.0, 1.0))
        kept = sum(int(np.sum(np.asarray(apply(model, b, eval_mode=True).boundaries["kept"]) & (b["segment_ids"] > 0)))
                   for b in data_lib.iterate_eval_batches(cfg, [data_lib.Document(text, lang)]))
        assert res[lang]["n_chunks"] == kept < 0.8 * res[lang]["n_positions"], (lang, res[lang], kept)


# ------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["mrt5_causal_tiny", pytest.param("mrt5_encdec_tiny", marks=pytest.mark.slow)])
def test_config_trains_and_checkpoints_the_controller(name, tmp_path, gin_clean):
    from train.checkpoint import Checkpointer
    from train.config import parse
    from train.loop import train

    steps = 8  # on one batch of 4 windows (max_windows = 4): every logged loss is on the same data
    encdec = name == "mrt5_encdec_tiny"  # its eval path (hard + soft) is covered above; skip the loop's eval
    parse([f"configs/{name}.gin", "configs/runs/default.gin"],
          [f"TRAIN_STEPS = {steps}", "SEQ_LEN = 64", "BATCH = 4", "models.MrT5Config.d_model = 32",
           "models.MrT5Config.d_ff = 64", "models.MrT5Config.num_heads = 2", "models.MrT5Config.regularizer_delay = 2",
           "train.OptimizerConfig.warmup_steps = 2", "train.train.log_every = 4", "train.train.eval_every = 0",
           "train/train.DataConfig.max_windows = 4", "eval/train.DataConfig.max_windows = 2",
           "train.train.sample_prompts = ()"] + (["train.train.eval_data = None"] if encdec else []))
    res = train(workdir=str(tmp_path))
    hist = res["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[0]["pi_p"] != 0.0 and "deletion_rate" in hist[-1]
    for k in ([] if encdec else ["hard_ce", "soft_ce", "deletion_rate", "alpha", "backbone_len"]):
        assert np.isfinite(res["eval"][k]), k
    # the trainer carried the controller state (TrainState.rest, outside the params) through every step ...
    state = res["setup"].state
    ctrl = state.rest["controller"]
    assert int(ctrl["step"][...]) == steps and float(ctrl["p"][...]) != 0.0
    assert "controller" not in state.params
    # ... and the final checkpoint restores it exactly
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, async_save=False)
    step, restored = ckpt.restore_latest(jax.tree.map(jnp.zeros_like, state))
    ckpt.close()
    assert step == steps
    for k in ("p", "i", "alpha", "step"):
        np.testing.assert_array_equal(restored.rest["controller"][k][...], ctrl[k][...])
