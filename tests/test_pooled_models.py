"""Rule-pooled models (models/hat.py, models/lyt.py, models/mean_pooled.py, models/spacebyte.py): prefix causality
with the word rule recomputed on every prefix, decode_step ≡ full forward (packed rows, host splitter flags for
HAT/LYT), gradients, LYT's block-diagonal decoder, host-splitter generation, and every gin config trains."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.boundary_rules import WordStartTracker, causal_word_starts, doc_starts, hat_word_starts
from models.hat import HATLM
from models.lyt import LYTLM
from models.mean_pooled import MeanPooledLM
from models.spacebyte import SpaceByteLM
from train.generate import generate, generate_arrays
from tests.helpers import REPO_ROOT, packed_row, pydoc_bytes, pydoc_text, stack_rows, tiny_stack, to_jnp
from train.step import cross_entropy_sums, eval_forward

jax.config.update("jax_default_matmul_precision", "highest")

T1 = tiny_stack("T1")
FACTORIES = {
    "fixed": lambda: MeanPooledLM(T1, T1, T1, rule="fixed", stride=3),
    "dtp_whitespace": lambda: MeanPooledLM(T1, T1, T1, rule="whitespace"),
    "spacebyte": lambda: SpaceByteLM(T1, tiny_stack("T1", d_model=48), T1),
    "hat": lambda: HATLM(T1, tiny_stack("T1", d_model=48), T1, connector_heads=2),
    "lyt": lambda: LYTLM(T1, tiny_stack("T1", d_model=48), T1, num_prefix=2, max_word_bytes=6),
}
WORDS = ("hat", "lyt")
# real text whose multi-byte opening quote starts a word (after "\n"): exercises the decided-start rule
DOC = pydoc_bytes("conversions", 90, offset=90)


@functools.lru_cache(maxsize=None)
def _model(name):
    return FACTORIES[name]()


@functools.lru_cache(maxsize=None)
def _jitted(name):
    graphdef, state = nnx.split(_model(name))
    return jax.jit(lambda s, b: nnx.merge(graphdef, s)(b)), state


def _forward(name, rows):
    fwd, state = _jitted(name)
    return fwd(state, to_jnp(stack_rows(rows)))


def _row(docs, L, eos=True):
    """Packed row with the data pipeline's word_starts annotation (computed on each document as given)."""
    row = packed_row([d for d in docs], L)
    ws = []
    for d in docs:
        ws += [True, *hat_word_starts(d)] + ([True] if eos else [])
    if not eos:  # prefixes: no EOS framing
        row["inputs"][len(ws)] = 0
        row["segment_ids"][len(ws)] = 0
    row["word_starts"] = np.pad(np.array(ws, bool), (0, L - len(ws)))
    return row


def _decided(batch):
    return np.asarray(causal_word_starts(jnp.asarray(batch["word_starts"]), jnp.asarray(batch["inputs"]),
                                         jnp.asarray(batch["segment_ids"])))


def test_multibyte_word_start_is_decided_at_the_characters_last_byte():
    raw = hat_word_starts(DOC)
    lead = [i for i in np.flatnonzero(raw) if DOC[i] >= 0xC0]
    assert lead, "the test text must contain a multi-byte word start"
    batch = stack_rows([_row([DOC], len(DOC) + 2)])
    dec = _decided(batch)[0]
    i = lead[0] + 1  # +1: BOS
    assert batch["word_starts"][0, i] and not dec[i] and not dec[i + 1] and dec[i + 2]  # 3-byte character


def test_one_word_rule_for_generation_and_forward():
    """Generation's word starts (WordStartTracker, one fed byte at a time) equal the forward's decided starts
    (causal_word_starts on the data pipeline's word_starts) on text, on the reliability battery's bad inputs
    (invalid UTF-8, NUL bytes, a binary, broken JSONL) and on random bytes (F5..FF, stray continuations)."""
    from tests.test_reliability import _binary_200k, _invalid_utf8_text, _jsonl_records

    rng = np.random.default_rng(0)
    bad = _invalid_utf8_text()
    docs = [pydoc_bytes("conversions", 300), pydoc_bytes("dict", 300, offset=1000),
            bad[450:560] + bad[850:950] + bad[-150:], pydoc_text("pass").encode().replace(b" ", b"\x00")[:200],
            _binary_200k()[:4000:9], _jsonl_records()[0][:400],
            *(rng.integers(0, 256, 300, dtype=np.uint8).tobytes() for _ in range(3))]
    assert any(0xF5 <= b <= 0xF7 for d in docs for b in d)
    batch = stack_rows([_row([d], max(map(len, docs)) + 2) for d in docs])  # one shape: one in-graph rule call
    decided = _decided(batch)
    for b, d in enumerate(docs):
        tr = WordStartTracker()
        got = [tr.push(int(x)) for x in batch["inputs"][b, :len(d) + 2]]
        np.testing.assert_array_equal(np.array(got), decided[b, :len(d) + 2], err_msg=repr(d[:40]))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_prefix_logits_equal_full_run(name):
    """Row k = BOS + DOC[:k] with the word rule recomputed on the prefix: logits at its positions equal the
    full document's (no leak through the segmentation)."""
    L = len(DOC) + 2
    rows = [_row([DOC], L)] + [_row([DOC[:k]], L, eos=False) for k in range(1, len(DOC))]
    out = _forward(name, rows)
    lg = np.asarray(out.logits_BxLxV)
    for k in range(1, len(DOC)):
        np.testing.assert_allclose(lg[k, :k + 1], lg[0, :k + 1], rtol=0, atol=1e-5, err_msg=f"{name} prefix {k}")
    assert np.asarray(out.target_mask_BxL).all()


def test_prefix_test_catches_undecided_word_starts(monkeypatch):
    """Reading the raw START bit at a multi-byte lead byte leaks the continuation bytes (trap 2)."""
    import models.common

    monkeypatch.setattr(models.common, "causal_word_starts", lambda ws, x, seg: ws | doc_starts(seg))
    L = len(DOC) + 2
    # a lead byte that does not open a word in the document, but does in the prefix that ends at it
    lead = next(i for i, s in enumerate(hat_word_starts(DOC)) if DOC[i] >= 0xC0 and not s)
    rows = [_row([DOC], L), _row([DOC[:lead + 1]], L, eos=False)]
    graphdef, state = nnx.split(_model("hat"))
    lg = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s)(b).logits_BxLxV)(state, to_jnp(stack_rows(rows))))
    assert np.abs(lg[1, lead + 1] - lg[0, lead + 1]).max() > 1e-4


def _decode_all(model, batch, flags):
    B, L = batch["inputs"].shape
    graphdef, state = nnx.split(model)
    words = flags is not None

    @jax.jit
    def step(state, tok, cache, reset, ws):
        m = nnx.merge(graphdef, state)
        return m.decode_step(tok, cache, reset, ws) if words else m.decode_step(tok, cache, reset)

    cache = jax.jit(lambda s: nnx.merge(graphdef, s).init_cache(B, L))(state)
    out = []
    for t in range(L):
        ws = jnp.asarray(flags[:, t]) if words else None
        lg, cache = step(state, jnp.asarray(batch["inputs"][:, t]), cache, jnp.asarray(batch["positions"][:, t] == 0),
                         ws)
        out.append(np.asarray(lg))
    return np.stack(out, 1)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_decode_step_matches_full_forward(name):
    L = 48
    rows = [_row([DOC[:L - 2]], L), _row([pydoc_bytes("lambda", L - 2, offset=300)], L),
            _row([pydoc_bytes("pass", 13), pydoc_bytes("await", L - 17)], L)]
    batch = stack_rows(rows)
    model = _model(name)
    full = np.asarray(_forward(name, rows).logits_BxLxV)
    flags = None
    if name in WORDS:  # flags from the host splitter, one fed byte at a time (what generation does)
        flags = np.zeros_like(batch["word_starts"])
        for b in range(len(rows)):
            for t in range(L):
                if batch["positions"][b, t] == 0:
                    tr = WordStartTracker()
                flags[b, t] = tr.push(int(batch["inputs"][b, t]))
        with pytest.raises(ValueError, match="word-start flag"):
            model.decode_step(jnp.asarray(batch["inputs"][:, 0]), model.init_cache(3, L), jnp.ones(3, bool))
    inc = _decode_all(model, batch, flags)
    np.testing.assert_allclose(inc, full, rtol=0, atol=1e-4, err_msg=name)
    assert np.abs(full).max() > 0.05


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_reach_every_parameter(name):
    graphdef, params, rest = nnx.split(_model(name), nnx.Param, ...)
    L = 64
    batch = stack_rows([_row([pydoc_bytes("assignment", 60)], L), _row([DOC[:60]], L)])
    batch["targets"] = np.concatenate([batch["inputs"][:, 1:], np.zeros((2, 1), np.int32)], 1)
    batch["loss_mask"] = np.concatenate([batch["segment_ids"][:, 1:] > 0, np.zeros((2, 1), bool)], 1)
    batch["byte_mask"] = batch["loss_mask"]

    def loss(p):
        s = cross_entropy_sums(nnx.merge(graphdef, p, rest)(batch), batch)
        return s["nll_sum"] / s["n_targets"]

    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert 5.0 < float(val) < 6.0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_lyt_decoder_is_block_diagonal_per_word():
    """Changing word k's canvas (prefix or a byte) changes only word k's outputs, and only from that slot on."""
    model = _model("lyt")
    B, M, C, p, D = 2, 5, model.C, model.p, 32
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    prefix = jax.random.normal(k1, (B, M, p, D))
    emb = jax.random.normal(k2, (B, M, C, D))
    in_word = jnp.arange(C)[None, None] < jnp.array([[3, 6, 1, 4, 2], [6, 6, 2, 5, 1]])[..., None]
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, *a: nnx.merge(graphdef, s).decode_words(*a))
    base = np.asarray(run(state, prefix, emb, in_word))
    k, c = 1, 2
    moved = np.asarray(run(state, prefix, emb.at[:, k, c].add(jax.random.normal(k3, (B, D))), in_word))
    diff = np.abs(moved - base).max(-1)  # [B, M, C]
    assert diff[:, k, c:int(in_word[0, k].sum())].min() > 1e-4  # the word itself changes from slot c on
    assert diff[:, k, :c].max() == 0  # causal inside the word
    assert np.delete(diff, k, axis=1).max() == 0  # no other word sees it
    moved = np.asarray(run(state, prefix.at[:, 3].add(1.0), emb, in_word))
    assert np.delete(np.abs(moved - base).max(-1), 3, axis=1).max() == 0


@pytest.mark.parametrize("name", WORDS)
def test_generate_matches_full_forward_on_text_and_random_bytes(name):
    """train.generate feeds the decided word starts of the one word rule: its logits equal the full forward's
    at every position, on text and on random bytes (invalid UTF-8: F5..FF, stray continuations, ...)."""
    model = _model(name)
    rng = np.random.default_rng(0)
    prompts = [DOC[:30], pydoc_bytes("lambda", 7, offset=60), rng.integers(0, 256, 30, dtype=np.uint8).tobytes()]
    outs, fed, logits = generate_arrays(model, prompts, max_new_bytes=10, temperature=0.0)
    T = 31 + 10  # longest row (BOS + 30 bytes) + new bytes
    assert len(outs) == 3 and fed.shape == (3, T) and logits.shape == (3, T, 256)
    # the generic entry point (train.sample, the trainer's samples) runs the same sampler
    texts = generate(model, prompts, max_new_bytes=10, temperature=0.0)
    assert texts == [o.split(b"\xff")[0].replace(b"\xfe", b"").decode("utf-8", errors="replace") for o in outs]
    rows = []
    for b in range(3):
        r = {"inputs": fed[b], "segment_ids": np.ones(T, np.int32), "positions": np.arange(T, dtype=np.int32)}
        r["word_starts"] = np.concatenate([[True], hat_word_starts(bytes(fed[b, 1:].astype(np.uint8).tolist()))])
        rows.append(r)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, b: eval_forward(graphdef, s, {}, b))(state, to_jnp(stack_rows(rows)))
    full, ok = np.asarray(out.logits_BxLxV), np.asarray(out.target_mask_BxL)
    assert ok.all()  # eval mode: no capacity overflow (random bytes are mostly one-byte words)
    np.testing.assert_allclose(logits, full, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(fed[0, 31:], logits[0, 30:-1].argmax(-1))  # greedy continuation


CONFIGS = ["hat_tiny", "lyt_tiny", "spacebyte_tiny", "fixed_tiny", "dtp_whitespace_tiny"]


@pytest.mark.slow  # default suite: tests/test_cli.py trains every tiny config through the CLI (2 steps)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_config_parses_and_loss_falls(cfg, gin_clean, tmp_path):
    import os

    from train.config import parse
    from train.loop import train

    parse([os.path.join(REPO_ROOT, "configs", f"{cfg}.gin"), os.path.join(REPO_ROOT, "configs/runs/default.gin")],
          ["TRAIN_STEPS = 12", "SEQ_LEN = 64", "BATCH = 4", "train.train.log_every = 1", "train.train.eval_every = 0",
           "train.train.checkpoint_every = 1000", "train.train.sample_prompts = ()",
           "eval/train.DataConfig.max_windows = 4", "train.OptimizerConfig.learning_rate = 1e-2",
           "train.OptimizerConfig.warmup_steps = 2"])
    res = train(workdir=str(tmp_path))
    losses = np.array([h["loss"] for h in res["history"]])
    assert np.isfinite(losses).all() and 5.0 < losses[0] < 6.0
    assert losses[-3:].mean() < losses[0] - 1.0, losses
    assert res["history"][-1]["bytes_per_chunk"] > 1.5
