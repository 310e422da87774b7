"""Boundary losses and targets for the DTP / MAGNET routers (boundaries.md §E, §9.7, traps 5-6).

In-graph (jnp):
  * ``binomial_nll(k, n, alpha)``: -log Binom(k; n, α) via gammaln (k may be non-integer).
  * ``route_binomial_loss``: MAGNET prior per route over that route's bytes of each row.
  * ``bce_with_logits``: BCE on *logits* (the reference applies σ twice; we do not).
  * ``entropy_spike_targets``: e_t = 1 iff H_t > H_{t-i} for i = 1..spikes_left (same document),
    the first ``spikes_left`` positions of a document default to 1; H from stop-gradient logits.

Host-side per-document annotations, registered in ``train.data.ANNOTATIONS`` at import
(``DataConfig.annotations=('unigram_ends',)`` / ``('doc_routes',)``); like the built-in ones they
return one value per framed byte [BOS, doc..., EOS]:
  * ``unigram_ends`` bool: END targets from a SentencePiece unigram model trained on the training
    split (``UnigramTargets``: sources, vocab size; gin-configurable as ``models.UnigramTargets``,
    trained once per process and cached). A piece's last byte closes a chunk and the space is attached
    to the word-final piece ("word␣"); BOS and EOS close their own one-byte chunks. A document that is
    not valid UTF-8 falls back to the whitespace rule (e_t = [x_t == ' ']).
  * ``doc_routes`` int32: MAGNET's per-sequence route: the document's dominant script group
    (``hnet.scripts``, most frequent causal byte route of the whole document), constant over the
    document. It stands in for the language label (language -> script is many-to-one); it is
    per-sequence side information, known before the document like MAGNET's prepended script token.
    On NTREX's 22 languages the dominant group is each language's script (jpn: kana), i.e. exactly
    MAGNET's ``language_to_script`` label, so no file-name label is needed.
  * ``script_routes_<g>`` / ``doc_routes_<g>``: the same two under another grouping g of
    ``hnet.scripts.GROUPINGS`` (``DTPConfig.script_groups``), e.g. ``script_routes_ntrex``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln


def binomial_nll(k, n, alpha):
    """-log Binom(k; n, α) = -[lnΓ(n+1) - lnΓ(k+1) - lnΓ(n-k+1) + k ln α + (n-k) ln(1-α)]."""
    k, n = jnp.asarray(k, jnp.float32), jnp.asarray(n, jnp.float32)
    log_pmf = (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
               + k * jnp.log(alpha) + (n - k) * jnp.log1p(-alpha))
    return -log_pmf


def route_binomial_loss(e_st_BxL, route_BxL, real_BxL, priors):
    """Per route r: L_r = mean over rows with n_br > 0 of binomial_nll(k_br, n_br, α_r) / n_br, with
    k_br = Σ_t e_st over the row's non-pad bytes of route r. Returns (mean over present routes, [R] L_r,
    [R] present)."""
    R = len(priors)
    onehot_BxLxR = (route_BxL[..., None] == jnp.arange(R)) & real_BxL[..., None]
    n_BxR = jnp.sum(onehot_BxLxR, axis=1).astype(jnp.float32)
    k_BxR = jnp.einsum("bl,blr->br", e_st_BxL.astype(jnp.float32), onehot_BxLxR.astype(jnp.float32))
    alpha_R = jnp.asarray(priors, jnp.float32)
    has_BxR = n_BxR > 0
    nll_BxR = jnp.where(has_BxR, binomial_nll(k_BxR, n_BxR, alpha_R) / jnp.maximum(n_BxR, 1.0), 0.0)
    rows_R = jnp.sum(has_BxR, axis=0)
    loss_R = jnp.sum(nll_BxR, axis=0) / jnp.maximum(rows_R, 1)
    present_R = rows_R > 0
    total = jnp.sum(loss_R) / jnp.maximum(jnp.sum(present_R), 1)
    return total, loss_R, present_R


def bce_with_logits(logits, targets, mask):
    """Mean over ``mask`` of -[y log σ(ℓ) + (1-y) log(1-σ(ℓ))], computed stably from the logits ℓ."""
    y = targets.astype(jnp.float32)
    ll = y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits)
    m = mask.astype(jnp.float32)
    return -jnp.sum(ll * m) / jnp.maximum(jnp.sum(m), 1.0)


def entropy_spike_targets(logits_BxLxV, positions_BxL, spikes_left: int = 2):
    """bool [B, L]: H_t > H_{t-i} for i = 1..spikes_left, True for the first ``spikes_left`` positions
    of each document (``positions`` restart at 0 per document). No gradient."""
    lg = jax.lax.stop_gradient(logits_BxLxV.astype(jnp.float32))
    logp = jax.nn.log_softmax(lg, axis=-1)
    H = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    spike = jnp.ones(H.shape, bool)
    for i in range(1, spikes_left + 1):
        prev = jnp.pad(H[:, :-i], ((0, 0), (i, 0)))
        spike &= H > prev
    return spike | (positions_BxL < spikes_left)


# ----------------------------------------------------------------------------------------------
# Host-side annotations
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UnigramTargets:
    """SentencePiece unigram model trained on ``sources`` (a train.data source list) split by
    ``doc_split``; one per configuration per process."""

    sources: tuple[str, ...] = ("builtin:pydoc_topics",)
    byte_range: tuple[float, float] = (0.0, 0.9)
    doc_split: str = "file"
    vocab_size: int = 2000
    max_sentence_bytes: int = 4096  # long documents are cut into lines/pieces of at most this for training

    def processor(self):
        return _train_unigram(self)


@functools.lru_cache(maxsize=4)
def _train_unigram(cfg: UnigramTargets):
    import io

    import sentencepiece as spm

    from train.data import DataConfig, load_documents

    docs, _ = load_documents(DataConfig(sources=cfg.sources, byte_range=cfg.byte_range, doc_split=cfg.doc_split))
    sentences = []
    for d in docs:
        for line in d.decode("utf-8", errors="ignore").split("\n"):
            for i in range(0, len(line), cfg.max_sentence_bytes // 4):
                if line[i:i + cfg.max_sentence_bytes // 4].strip():
                    sentences.append(line[i:i + cfg.max_sentence_bytes // 4])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=cfg.vocab_size,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        character_coverage=0.9995, hard_vocab_limit=False, max_sentence_length=cfg.max_sentence_bytes,
        num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def unigram_ends(doc: bytes, sp) -> np.ndarray:
    """END targets of one document (no framing): piece ends, with a piece's leading space moved to the
    previous piece (so "word␣" closes at the space). bool [len(doc)]."""
    try:
        text = doc.decode("utf-8")
    except UnicodeDecodeError:
        return np.frombuffer(doc, np.uint8) == 0x20
    e = np.zeros(len(doc), bool)
    for piece in sp.encode(text, return_type="proto").pieces:
        a, b = piece.begin, piece.end  # byte offsets into the UTF-8 text
        if b <= a:
            continue
        lead_spaces = len(doc[a:b]) - len(doc[a:b].lstrip(b" "))
        if lead_spaces and a > 0:
            e[a - 1] = False  # the previous piece does not end before the space ...
            e[a + lead_spaces - 1] = True  # ... but at it ("word␣")
        e[b - 1] = True
    if len(doc):
        e[-1] = True
    return e


def _active_unigram() -> UnigramTargets:
    """The gin-bound ``models.UnigramTargets`` (defaults when gin does not know it)."""
    import gin

    try:
        return gin.get_configurable("models.UnigramTargets")()
    except (ValueError, KeyError):
        return UnigramTargets()


def _unigram_annotation(doc: bytes) -> np.ndarray:
    return np.concatenate([[True], unigram_ends(doc, _active_unigram().processor()), [True]])


def dominant_route(doc: bytes, groups=None) -> int:
    """Most frequent causal byte route of ``doc`` under ``groups`` (default hnet.scripts.SCRIPT_GROUPS)."""
    from hnet.scripts import SCRIPT_GROUPS, byte_routes

    r = byte_routes(doc, SCRIPT_GROUPS if groups is None else groups)
    return int(np.bincount(r).argmax()) if len(r) else 0


def _script_routes_annotation(doc: bytes, groups) -> np.ndarray:
    """Per-byte routes framed as train.data's ``script_routes``: BOS route 0, EOS the last byte's route."""
    from hnet.scripts import byte_routes

    r = byte_routes(doc, groups).astype(np.int32)
    return np.concatenate([[0], r, r[-1:]])


def _doc_routes_annotation(doc: bytes, groups=None) -> np.ndarray:
    return np.full(len(doc) + 2, dominant_route(doc, groups), np.int32)


def register_annotations():
    """``unigram_ends`` and ``doc_routes`` (MAGNET grouping), and for every other grouping g of
    hnet.scripts.GROUPINGS ``script_routes_<g>`` / ``doc_routes_<g>`` (e.g. ``script_routes_ntrex``)."""
    from hnet.scripts import GROUPINGS
    from train import data

    data.ANNOTATIONS.setdefault("unigram_ends", (_unigram_annotation, bool))
    data.ANNOTATIONS.setdefault("doc_routes", (_doc_routes_annotation, np.int32))
    for name, groups in GROUPINGS.items():
        if name != "magnet":
            data.ANNOTATIONS.setdefault(f"script_routes_{name}",
                                        (functools.partial(_script_routes_annotation, groups=groups), np.int32))
            data.ANNOTATIONS.setdefault(f"doc_routes_{name}",
                                        (functools.partial(_doc_routes_annotation, groups=groups), np.int32))


register_annotations()
