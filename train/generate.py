"""Batched byte sampling (temperature, top-p) with per-row caches: every model's ``decode_step``.

Prompts of different lengths run in one batch: at position t row b is fed its prompt byte while
t < len_b, then its own previous sample. Output is decoded with errors='replace'. Models whose
``decode_step`` takes a per-byte side input computed on the host from the row so far (``decode_trackers``:
HAT/LYT word starts, MAGNET script or document routes) run one jit call per byte (``_generate_hosted``);
the others run one ``lax.scan``.
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


def _eval_model(graphdef, state):
    model = nnx.merge(graphdef, state)
    model.eval()  # deterministic decisions, capacities that cannot overflow
    return model


def make_generate_fn(graphdef, total_len: int, temperature: float, top_p: float):
    """jit(state, prompts [B, T0], lens [B], key) -> (samples [B, T], fed tokens [B, T], logits [B, T, V])."""

    @jax.jit
    def run(state, prompts_BxT, lens_B, key):
        model = _eval_model(graphdef, state)
        B = prompts_BxT.shape[0]
        cache = model.init_cache(B, total_len)

        def body(carry, t):
            cache, prev, key = carry
            key, sub = jax.random.split(key)
            tok = jnp.where(t < lens_B, prompts_BxT[:, jnp.minimum(t, prompts_BxT.shape[1] - 1)], prev)
            logits, cache = model.decode_step(tok, cache, jnp.full((B,), t == 0), None)
            nxt = sample_logits(sub, logits, temperature, top_p)
            return (cache, nxt, key), (nxt, tok, logits)

        init = (cache, jnp.zeros((B,), jnp.int32), key)
        _, (samples_TxB, fed_TxB, logits_TxBxV) = jax.lax.scan(body, init, jnp.arange(total_len))
        return samples_TxB.T, fed_TxB.T, jnp.swapaxes(logits_TxBxV, 0, 1)

    return run


def make_hosted_step_fns(graphdef, batch_size: int, total_len: int):
    """(jit(state) -> cache, jit(state, tokens_B, cache, reset_B, side_B) -> (logits_BxV, cache)) in eval mode;
    ``side_B``: the per-byte host input of ``decode_step`` (word-start bit, route)."""

    @jax.jit
    def step(state, tok, cache, reset, side):
        return _eval_model(graphdef, state).decode_step(tok, cache, reset, side)

    return jax.jit(lambda s: _eval_model(graphdef, s).init_cache(batch_size, total_len)), step


def continuation_text(new: bytes) -> str:
    """Sampled bytes -> text: cut at the first EOS, BOS dropped, invalid UTF-8 shown as U+FFFD."""
    return new.split(bytes([EOS]))[0].replace(bytes([BOS]), b"").decode("utf-8", errors="replace")


def generate(model, prompts: list[bytes], *, max_new_bytes: int = 128, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, langs: list[str] | None = None) -> list[str]:
    """Continue each prompt (BOS is prepended) by up to ``max_new_bytes``; stops a row at EOS. ``langs``: the
    document language of each prompt (models routed by language need it)."""
    outs, _, _ = generate_arrays(model, prompts, max_new_bytes=max_new_bytes, temperature=temperature, top_p=top_p,
                                 seed=seed, langs=langs)
    return [continuation_text(o) for o in outs]


def generate_arrays(model, prompts: list[bytes], *, max_new_bytes: int = 128, temperature: float = 0.8,
                    top_p: float = 0.95, seed: int = 0, langs: list[str] | None = None):
    """(continuation bytes of each row (``max_new_bytes``), fed tokens [B, T], logits seen at each fed token
    [B, T, V]) with T = longest BOS + prompt + ``max_new_bytes``."""
    rows = [bytes([BOS]) + p for p in prompts]
    lens = np.array([len(r) for r in rows], np.int32)
    T = int(lens.max()) + max_new_bytes
    trackers = model.decode_trackers(prompts, langs)
    graphdef, state = nnx.split(model)
    if trackers is None:
        arr = np.zeros((len(rows), int(lens.max())), np.int32)
        for i, r in enumerate(rows):
            arr[i, :len(r)] = np.frombuffer(r, np.uint8)
        run = make_generate_fn(graphdef, T, temperature, top_p)
        out = run(state, jnp.asarray(arr), jnp.asarray(lens), jax.random.key(seed))
        samples, fed, logits = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in out)
    else:
        samples, fed, logits = _generate_hosted(graphdef, state, rows, trackers, T, temperature, top_p, seed)
    outs = [bytes(samples[i, n - 1:n - 1 + max_new_bytes].astype(np.uint8).tolist()) for i, n in enumerate(lens)]
    return outs, fed, logits


def _generate_hosted(graphdef, state, rows: list[bytes], trackers, T: int, temperature: float, top_p: float,
                     seed: int):
    """Rows advance together one byte per jit call; each row's tracker turns the fed byte into its side input
    (``tracker.push(byte)``). -> (samples [B, T], fed [B, T], logits [B, T, V])."""
    B = len(rows)
    init, step = make_hosted_step_fns(graphdef, B, T)
    cache = init(state)
    key = jax.random.key(seed)
    fed, samples = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    all_logits = []
    prev = np.zeros(B, np.int32)
    for t in range(T):
        tok = np.array([rows[b][t] if t < len(rows[b]) else prev[b] for b in range(B)], np.int32)
        side = np.array([trackers[b].push(int(tok[b])) for b in range(B)])
        fed[:, t] = tok
        logits, cache = step(state, jnp.asarray(tok), cache, jnp.full((B,), t == 0), jnp.asarray(side))
        key, sub = jax.random.split(key)
        prev = samples[:, t] = np.asarray(sample_logits(sub, logits, temperature, top_p))
        all_logits.append(np.asarray(logits))
    return samples, fed, np.stack(all_logits, 1)
