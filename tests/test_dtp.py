"""DTP learned routers (models/dtp.py, models/common.py HourglassLM, hnet/dynamic_pooling.py): losses, targets,
pooling rule, prefix causality with position-derived Gumbel noise, evaluation determinism, decode ≡ forward,
gradients, and the gin config training a few steps."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet import dynamic_pooling as dp
from hnet.dynamic_pooling import DTPPooling
from models.common import DTPConfig
from models.dtp import DTPLM
from tests.helpers import packed_row, pydoc_bytes, pydoc_docs, stack_rows, to_jnp
from train.annotations import unigram_ends
from train.data import UnigramTargets

TINY = dict(pre_layout="T1", inner_layout="T1", post_layout="T1", d_model=32, d_ff=64, num_heads=2)


def test_binomial_loss_hand_value():
    # C(5,2) 0.2^2 0.8^3 = 0.2048 ; -ln(0.2048) / 5 = 0.317124
    assert float(dp.binomial_nll(2.0, 5.0, 0.2)) / 5 == pytest.approx(-math.log(0.2048) / 5, rel=1e-5)
    # two rows, route 0 (α=0.2) and route 1 (α=0.5); pads excluded from n
    e_st = jnp.array([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    route = jnp.array([[0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1]])
    real = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], bool)
    total, loss_R, present = dp.route_binomial_loss(e_st, route, real, (0.2, 0.5))
    # route 0: row0 k=2 n=5 ; row1 k=1 n=2 ; route 1: row0 k=1 n=1 ; row1 k=1 n=3
    r0 = (-math.log(0.2048) / 5 + -math.log(2 * 0.2 * 0.8) / 2) / 2
    r1 = (-math.log(0.5) / 1 + -math.log(3 * 0.125) / 3) / 2
    np.testing.assert_allclose(np.asarray(loss_R), [r0, r1], rtol=1e-5)
    assert float(total) == pytest.approx((r0 + r1) / 2, rel=1e-5)
    assert bool(present.all())


def test_bce_on_logits_hand_value():
    logits = jnp.array([[2.0, -1.0, 5.0]])
    targets = jnp.array([[True, False, True]])
    mask = jnp.array([[True, True, False]])
    want = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2  # 0.220095
    assert float(dp.bce_with_logits(logits, targets, mask)) == pytest.approx(want, rel=1e-5)
    # the reference bug (σ applied twice) gives a clearly different value
    twice = float(dp.bce_with_logits(jax.nn.sigmoid(logits), targets, mask))
    assert abs(twice - want) > 0.1


def test_entropy_spike_targets():
    # entropies per position via uniform distributions over k symbols: H = ln k
    ks = [2, 4, 3, 8, 1, 5, 9, 7, 200]
    V = 256
    logits = jnp.stack([jnp.where(jnp.arange(V) < k, 0.0, -1e9) for k in ks])[None]
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3]])  # a second document starts at index 5
    t = np.asarray(dp.entropy_spike_targets(logits, positions, spikes_left=2))[0]
    # H > H_{t-1} and H > H_{t-2}; first two positions of each document default to True
    assert t.shape == (9,)
    assert t.tolist() == [True, True, False, True, False, True, True, False, True]
    g = jax.grad(lambda lg: jnp.sum(dp.entropy_spike_targets(lg, positions).astype(jnp.float32)))(logits)
    assert float(jnp.abs(g).sum()) == 0.0


@pytest.fixture(scope="module")
def unigram_proc():
    return UnigramTargets(sources=("builtin:pydoc_topics",), byte_range=(0.0, 0.2), vocab_size=300).processor()


def test_unigram_targets_attach_space_to_word_final_piece(unigram_proc, gin_clean):
    doc = pydoc_bytes("assignment", 2000)
    e = unigram_ends(doc, unigram_proc)
    assert e.shape == (len(doc),) and e.dtype == bool and e[-1]
    is_alpha = np.array([chr(c).isalpha() for c in doc])
    spaces = [i for i in range(1, len(doc) - 1) if doc[i] == 0x20 and is_alpha[i - 1] and is_alpha[i + 1]]
    assert len(spaces) > 100
    assert all(e[i] and not e[i - 1] for i in spaces)  # "word␣" closes at the space, never before it
    assert 1.5 < len(doc) / e.sum() < 8  # subword-sized chunks
    # the data annotation frames it: [BOS, doc, EOS] with one-byte BOS/EOS chunks
    from train.annotations import annotate

    assert annotate(doc, ("unigram_ends",), unigram_proc)["unigram_ends"].shape == (len(doc) + 2,)


def test_pooling_rule():
    """Null before the first close, the closing byte reads its own chunk, documents never mix."""
    D = 4
    pool = DTPPooling(D, rngs=nnx.Rngs(0))
    h = jnp.asarray(np.random.RandomState(0).randn(1, 8, D), jnp.float32)
    e = jnp.array([[0, 1, 0, 0, 1, 0, 1, 0]], bool)
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
    graphdef, state = nnx.split(pool)

    @jax.jit
    def run(state):
        p = nnx.merge(graphdef, state)
        pooled = p.pool(h, e, seg, M=8)
        return p.broadcast(pooled.z_BxMxD, pooled), pooled.segment_ids_BxM  # inner = identity

    u, zseg = run(state)
    u = np.asarray(u)[0]
    null = np.asarray(pool.null_slot(1))[0]
    chunk = lambda a, b: np.asarray(pool.chunk_slot(h[0, a:b].sum(0)[None], jnp.array([b - a], jnp.float32)))[0]  # noqa: E731
    want = [null, chunk(0, 2), chunk(0, 2), chunk(0, 2), chunk(2, 5), null, chunk(5, 7), chunk(5, 7)]
    np.testing.assert_allclose(u, np.stack(want), atol=1e-5)
    assert np.asarray(zseg)[0].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]


# ------------------------------------------------------------------------------------------ model


def _batch(L=80):
    docs = pydoc_docs()
    rows = [packed_row([docs[0][:30], docs[1][:25]], L), packed_row([docs[2][:70]], L)]
    return stack_rows(rows)


def make_fwd(model, deterministic):
    """jit(state, batch) -> (logits, START boundaries, new state) in training or evaluation mode."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, batch):
        m = nnx.merge(graphdef, state)
        if deterministic:
            m.eval()
        out = m(batch)
        return out.logits_BxLxV, out.boundaries["s0"], nnx.state(m)

    return fwd, state


@pytest.fixture(scope="module")
def gm():
    """One tiny Gumbel DTP model (α = 0.4) with its jitted training and evaluation forwards."""
    model = DTPLM(DTPConfig(**TINY, priors=(0.4,)), seed=1)
    train_fwd, state = make_fwd(model, False)
    return {"model": model, "state": state, "train": train_fwd, "eval": make_fwd(model, True)[0]}


def test_prefix_causality_gumbel_training_mode(gm):
    """Training mode (noise on): every prefix run (the rest replaced by padding) gives the full run's
    logits and boundaries on the prefix, because the noise is keyed by (step, row, position)."""
    full = _batch()
    cuts = [1, 7, 31, 33, 50, 79]
    L = full["inputs"].shape[1]
    fwd, state = gm["train"], gm["state"]
    rows_full = {k: np.repeat(v[:1], len(cuts), 0) for k, v in full.items()}
    rows_pre = {k: v.copy() for k, v in rows_full.items()}
    for i, c in enumerate(cuts):
        for k in rows_pre:
            rows_pre[k][i, c:] = 0
    lf, bf, _ = fwd(state, to_jnp(rows_full))
    lp, bp, _ = fwd(state, to_jnp(rows_pre))
    for i, c in enumerate(cuts):
        np.testing.assert_allclose(np.asarray(lp[i, :c]), np.asarray(lf[i, :c]), atol=2e-5)
        assert (np.asarray(bp[i, :c]) == np.asarray(bf[i, :c])).all()
    assert 0 < int(bf[0].sum()) < L


def test_gumbel_noise_per_step_and_deterministic_eval(gm):
    batch = to_jnp(_batch())
    train_fwd, state = gm["train"], gm["state"]
    _, b1, s1 = train_fwd(state, batch)
    _, b2, _ = train_fwd(s1, batch)  # the counter advanced: new noise
    assert (np.asarray(b1) != np.asarray(b2)).any()
    eval_fwd = gm["eval"]
    l1, e1, _ = eval_fwd(state, batch)
    l2, e2, _ = eval_fwd(s1, batch)  # eval ignores the training counter
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))


def _decode_all(model, batch, routes=None):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        m = nnx.merge(graphdef, state)
        m.eval()
        B, L = batch["inputs"].shape
        cache = m.init_cache(B, L)

        def body(cache, xs):
            tok, reset, r = xs
            lg, cache = m.decode_step(tok, cache, reset, r if routes is not None else None)
            return cache, lg

        r = jnp.swapaxes(batch[routes if routes is not None else "inputs"], 0, 1)  # [L, B] or [L, B, 2]
        _, ls = jax.lax.scan(body, cache, (batch["inputs"].T, (batch["positions"] == 0).T, r))
        return jnp.swapaxes(ls, 0, 1)

    return run(state, batch)


def test_decode_step_matches_forward(gm):
    """Evaluation rule (fixed-key noise): decode_step byte by byte ≡ the full forward, B = 2 rows with
    different packings (two documents vs one)."""
    batch = to_jnp(_batch())
    lf, bf, _ = gm["eval"](gm["state"], batch)
    ld = _decode_all(gm["model"], batch)
    real = np.asarray(batch["segment_ids"]) > 0
    np.testing.assert_allclose(np.asarray(ld)[real], np.asarray(lf)[real], atol=1e-4)
    assert 0 < int(np.asarray(bf).sum())


def test_gradients_reach_every_parameter(gm):
    graphdef, params, rest = nnx.split(gm["model"], nnx.Param, ...)
    batch = to_jnp(_batch())
    batch["targets"] = jnp.roll(batch["inputs"], -1, axis=1)
    batch["loss_mask"] = batch["segment_ids"] > 0

    def loss(params, rest):
        out = nnx.merge(graphdef, params, rest)(batch)
        lp = jax.nn.log_softmax(out.logits_BxLxV)
        nll = -jnp.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]) + out.aux_loss

    grads = jax.jit(jax.grad(loss))(params, rest)
    zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g))]
    assert not zero, zero


def train_shrunk(model_file: str, run_file: str, workdir: str) -> dict:
    """train.train on a DTP-family config shrunk to d 32, one layer per stack, 12 steps of 4 x 64 bytes."""
    from train import config
    from train.loop import train

    config.parse([model_file, run_file],
                 ["TRAIN_STEPS=12", "SEQ_LEN=64", "BATCH=4", "models.DTPConfig.d_model=32",
                  "models.DTPConfig.d_ff=64", "models.DTPConfig.num_heads=2", "models.DTPConfig.pre_layout='T1'",
                  "models.DTPConfig.inner_layout='T1'", "models.DTPConfig.post_layout='T1'",
                  "train.OptimizerConfig.warmup_steps=2", "train.train.log_every=1",
                  "train.train.sample_prompts=()", "eval/train.DataConfig.max_windows=4"])
    return train(workdir=workdir)


@pytest.mark.slow  # default suite: tests/test_cli.py trains every tiny config through the CLI (2 steps)
def test_config_trains_with_falling_loss(tmp_path):
    res = train_shrunk("configs/dtp_gumbel_tiny.gin", "configs/runs/default.gin", str(tmp_path))
    losses = [h["ce"] for h in res["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert np.isfinite(res["eval"]["bpb"]) and "bytes_per_chunk_s0" in res["eval"]
