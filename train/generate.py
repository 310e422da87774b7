"""Batched byte sampling (temperature, top-p) with per-row caches: every model's ``decode_step``.

Prompts of different lengths run in one batch: at position t row b is fed its prompt byte while
t < len_b, then its own previous sample. Output is decoded with errors='replace'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hnet.bytes import BOS, EOS


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


def generate(model, prompts: list[bytes], *, max_new_bytes: int = 128, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0) -> list[str]:
    """Continue each prompt (BOS is prepended) by up to ``max_new_bytes``; stops a row at EOS."""
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
    outs = []
    for i, n in enumerate(lens):
        new = samples[i, n - 1:n - 1 + max_new_bytes].tolist()
        if EOS in new:
            new = new[:new.index(EOS)]
        outs.append(bytes(b for b in new if b != BOS).decode("utf-8", errors="replace"))
    return outs
