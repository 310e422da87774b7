"""Batched byte sampling (temperature, top-p) with per-row caches: every model's ``decode_step``.

Prompts of different lengths run in one batch: at position t row b is fed its prompt byte while
t < len_b, then its own previous sample. Output is decoded with errors='replace'. Word-pooled models
(``decode_needs_word_starts``: HAT, LYT) go through ``generate_words``, whose host-side splitter decides
each fed byte's word-start bit incrementally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hnet.bytes import BOS, EOS
from models.pooling import WordStartTracker, make_word_decode_fn


def sample_logits(key, logits_BxV, temperature: float, top_p: float):
    """Greedy at temperature 0; otherwise nucleus sampling over the smallest set with mass >= top_p."""
    if temperature <= 0:
        return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
    logits = logits_BxV / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


def make_generate_fn(graphdef, total_len: int, temperature: float, top_p: float):
    @jax.jit
    def run(state, prompts_BxT, lens_B, key):
        model = nnx.merge(graphdef, state)
        model.eval()
        B = prompts_BxT.shape[0]
        cache = model.init_cache(B, total_len)

        def body(carry, t):
            cache, prev, key = carry
            key, sub = jax.random.split(key)
            tok = jnp.where(t < lens_B, prompts_BxT[:, jnp.minimum(t, prompts_BxT.shape[1] - 1)], prev)
            logits, cache = model.decode_step(tok, cache, jnp.full((B,), t == 0))
            nxt = sample_logits(sub, logits, temperature, top_p)
            return (cache, nxt, key), (nxt, logits)

        init = (cache, jnp.zeros((B,), jnp.int32), key)
        _, (samples_TxB, logits_TxBxV) = jax.lax.scan(body, init, jnp.arange(total_len))
        return samples_TxB.T, jnp.swapaxes(logits_TxBxV, 0, 1)

    return run


def continuation_text(new: bytes) -> str:
    """Sampled bytes -> text: cut at the first EOS, BOS dropped, invalid UTF-8 shown as U+FFFD."""
    return new.split(bytes([EOS]))[0].replace(bytes([BOS]), b"").decode("utf-8", errors="replace")


def generate(model, prompts: list[bytes], *, max_new_bytes: int = 128, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0) -> list[str]:
    """Continue each prompt (BOS is prepended) by up to ``max_new_bytes``; stops a row at EOS."""
    if getattr(model, "decode_needs_word_starts", False):
        outs, _, _ = generate_words(model, prompts, max_new_bytes=max_new_bytes, temperature=temperature,
                                    top_p=top_p, seed=seed)
        return [continuation_text(o) for o in outs]
    rows = [bytes([BOS]) + p for p in prompts]
    lens = np.array([len(r) for r in rows], np.int32)
    T = int(lens.max()) + max_new_bytes
    arr = np.zeros((len(rows), int(lens.max())), np.int32)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = np.frombuffer(r, np.uint8)
    graphdef, state = nnx.split(model)
    run = make_generate_fn(graphdef, T, temperature, top_p)
    samples, _ = run(state, jnp.asarray(arr), jnp.asarray(lens), jax.random.key(seed))
    samples = np.asarray(multihost_utils.process_allgather(samples, tiled=True))
    return [continuation_text(bytes(samples[i, n - 1:n - 1 + max_new_bytes].tolist())) for i, n in enumerate(lens)]


def generate_words(model, prompts: list[bytes], *, max_new_bytes: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, max_word_bytes: int = 100):
    """Batched sampling for models whose ``decode_step`` takes a per-row word-start flag (HAT, LYT;
    ``decode_needs_word_starts = True``).

    Rows advance together one byte per call; the host splitter decides each fed byte's (decided) start bit
    incrementally. Returns (continuations as bytes, fed tokens [B, T], logits [B, T, V])."""
    rows = [bytes([BOS]) + p for p in prompts]
    lens = [len(r) for r in rows]
    B, T = len(rows), max(lens) + max_new_bytes
    graphdef, state = nnx.split(model)
    step = make_word_decode_fn(graphdef)
    cache = jax.jit(lambda s: nnx.merge(graphdef, s).init_cache(B, T))(state)
    trackers = [WordStartTracker(max_word_bytes) for _ in range(B)]
    key = jax.random.key(seed)
    fed = np.zeros((B, T), np.int32)
    all_logits = []
    prev = np.zeros(B, np.int32)
    for t in range(T):
        tok = np.array([rows[b][t] if t < lens[b] else prev[b] for b in range(B)], np.int32)
        ws = np.array([trackers[b].push(int(tok[b])) for b in range(B)])
        fed[:, t] = tok
        logits, cache = step(state, jnp.asarray(tok), cache, jnp.full((B,), t == 0), jnp.asarray(ws))
        key, sub = jax.random.split(key)
        prev = np.asarray(sample_logits(sub, logits, temperature, top_p))
        all_logits.append(np.asarray(logits))
    outs = [bytes(fed[b, lens[b]:].astype(np.uint8).tolist()) + bytes([int(prev[b])]) for b in range(B)]
    return outs, fed, np.stack(all_logits, 1)
