"""Shared test utilities: real-text snippets, tiny model factories, batch builders.

All text comes from real corpora, never from strings written for the tests: the Python reference
documentation shipped with CPython (``pydoc_data.topics``) or ``../shared/data`` (skipped when absent).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.bytes import BOS, EOS
from hnet.layers import StackConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------- text


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def pydoc_text(key: str) -> str:
    """One topic of the Python reference documentation, e.g. ``pydoc_text('assignment')``."""
    return pydoc_topics()[key]


def pydoc_bytes(key: str, n: int | None = None, offset: int = 0) -> bytes:
    data = pydoc_text(key).encode("utf-8")
    return data[offset:] if n is None else data[offset:offset + n]


def pydoc_docs(keys=("pass", "continue", "lambda", "await")) -> list[bytes]:
    return [pydoc_text(k).encode("utf-8") for k in keys]


def shared_text_path(*parts: str) -> str:
    """Path of a file under ../shared/data, or pytest.skip when it is absent. Only for tests marked
    ``@pytest.mark.shared_data`` (an error otherwise, whether or not the data is present)."""
    from tests.conftest import SHARED_DATA_MARKED
    from train.sources import shared_path

    if "PYTEST_CURRENT_TEST" in os.environ and not SHARED_DATA_MARKED[0]:
        raise AssertionError("a test that reads ../shared/data must be marked @pytest.mark.shared_data")

    path = shared_path(*parts)
    if not os.path.isfile(path):
        pytest.skip(f"shared data file {path} is absent (../shared/data not available)")
    return path


def shakespeare_path() -> str:
    return shared_text_path("tinyshakespeare", "input.txt")


# ---------------------------------------------------------------------------------------- models


def tiny_stack(layout: str = "T2", d_model: int = 32, d_ff: int = 64, num_heads: int = 2, window: int = -1,
               **kw) -> StackConfig:
    return StackConfig(layout=layout, d_model=d_model, d_ff=d_ff, num_heads=num_heads, window=window, **kw)


def tiny_model_fn(layout: str = "T2", d_model: int = 32, d_ff: int = 64, num_heads: int = 2, window: int = -1,
                  seed: int = 0, **model_kw):
    """A zero-argument factory (what ``train.train(model=...)`` and ``build_state`` take)."""
    from models.isotropic import IsotropicLM

    return functools.partial(IsotropicLM, tiny_stack(layout, d_model, d_ff, num_heads, window), seed=seed,
                             **model_kw)


def host_init(abstract_state, seed: int = 0):
    """Concrete values for an abstract nnx.State, drawn on the host (no per-parameter compilation, which
    costs seconds on a busy CPU): embeddings N(0, 1), norm scales 1, other weights N(0, 0.02) -- the
    distributions of the models' own initialisers. Non-float leaves (counters, ...) are zeros."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        names = jax.tree_util.keystr(path)
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        if "scale" in names:
            return jnp.ones(s.shape, s.dtype)
        std = 1.0 if "embedding" in names else 0.02
        return jnp.asarray(rng.normal(0.0, std, s.shape).astype(np.float32)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def make_tiny_model(seed: int = 0, **kw):
    """A concrete tiny IsotropicLM: traced abstractly under the default mesh, then filled by ``host_init``
    (models built with the same ``seed`` and shapes have identical parameters, whatever their dtype)."""
    from hnet.sharding import make_mesh, mesh_context

    with mesh_context(make_mesh()):
        abstract = nnx.eval_shape(tiny_model_fn(**kw))
        graphdef, state = nnx.split(abstract)
        return nnx.merge(graphdef, host_init(state, seed))


# --------------------------------------------------------------------------------------- batches


def frame(doc: bytes) -> list[int]:
    return [BOS, *doc, EOS]


def packed_row(docs: list[bytes], L: int, framed: bool = True) -> dict[str, np.ndarray]:
    """One row packing ``docs`` (framed with BOS/EOS unless ``framed`` is False); padded with segment 0."""
    toks, seg, pos = [], [], []
    for i, d in enumerate(docs):
        ids = frame(d) if framed else list(d)
        toks += ids
        seg += [i + 1] * len(ids)
        pos += list(range(len(ids)))
    assert len(toks) <= L, (len(toks), L)
    pad = L - len(toks)
    return {"inputs": np.array(toks + [0] * pad, np.int32), "segment_ids": np.array(seg + [0] * pad, np.int32),
            "positions": np.array(pos + [0] * pad, np.int32)}


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def text_row(data: bytes) -> dict[str, np.ndarray]:
    """A single-document row of raw bytes (no framing), positions 0..L-1."""
    L = len(data)
    return {"inputs": np.frombuffer(data, np.uint8).astype(np.int32), "segment_ids": np.ones(L, np.int32),
            "positions": np.arange(L, dtype=np.int32)}


def make_forward(model):
    """jit(state, batch) -> fp32 logits of ``model``'s graph (reused across calls with new states)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, batch):
        return nnx.merge(graphdef, state)(batch).logits_BxLxV

    return fwd, state


def to_jnp(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}
