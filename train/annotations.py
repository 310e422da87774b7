"""Per-document annotations: host-side rules that need the whole document, one value per framed byte
[BOS, doc..., EOS] (``DataConfig.annotations`` names them; ``ANNOTATIONS`` maps name -> (fn, dtype);
``annotate`` computes them).

  * ``word_starts`` bool: HAT splitter word starts (``hnet.boundary_rules.hat_word_starts``); BOS and EOS
    start their own one-byte words (HAT, LYT, word-alignment metrics).
  * ``script_routes`` int32: the causal Unicode-script route of each byte (``hnet.scripts``, MAGNET
    grouping); BOS takes route 0, EOS the last byte's route. ``target_script_routes``: the route of each
    position's *target* byte (evaluation: BPB per script).
  * ``unigram_ends`` bool: DTP's unigram END targets from a SentencePiece unigram model trained on the
    training split, passed in (``annotate(..., unigram_sp)``; ``train.data.UnigramTargets`` trains it, the
    trainer gives gin's ``train.UnigramTargets`` as ``DataConfig.unigram``). A piece's last byte closes a
    chunk and the space is attached to the word-final piece ("word␣"); BOS and EOS close their own one-byte
    chunks. A document that is not valid UTF-8 falls back to the whitespace rule (e_t = [x_t == ' ']).
  * ``doc_routes`` int32: MAGNET's per-sequence route: the document's dominant script group (most
    frequent causal byte route of the whole document), constant over the document. It stands in for the
    language label (language -> script is many-to-one); it is per-sequence side information, known before
    the document like MAGNET's prepended script token. On NTREX's 22 languages the dominant group is each
    language's script (jpn: kana), i.e. exactly MAGNET's ``language_to_script`` label.
  * ``script_routes_<g>`` / ``doc_routes_<g>``: the same two under another grouping g of
    ``hnet.scripts.GROUPINGS`` (``DTPConfig.script_groups``), e.g. ``script_routes_ntrex``.
  * ``premium_<m>`` float32: the document's byte premium estimated from its prefix at every byte
    (``hnet.premium.premium_estimates`` with ``INVENTORY_MODELS[m]``; 0 = no estimate yet): BOS 0, EOS its
    value after the document (no character: one byte more). MAGNET's catch-all routes read it
    (``DTPConfig.premium_routes``).
  * ``lang_routes_<s>`` int32: the document's language label, constant over the document: the index in
    ``hnet.scripts.LANGUAGE_SETS[s]`` of the stem of the file it came from (``train.sources.Document.source``;
    ntrex128/*/<lang>.txt). MAGNET's per-sequence routing with one route per language.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from hnet.boundary_rules import hat_word_starts
from hnet.bytes import EOS
from hnet.premium import INVENTORY_MODELS, premium_estimates
from hnet.scripts import GROUPINGS, LANGUAGE_SETS, SCRIPT_GROUPS, byte_routes, dominant_route
from train.sources import DataError


def _framed_word_starts(doc: bytes) -> np.ndarray:
    return np.concatenate([[True], hat_word_starts(doc), [True]])


def _script_routes(doc: bytes, groups=SCRIPT_GROUPS) -> np.ndarray:
    r = byte_routes(doc, groups).astype(np.int32)
    return np.concatenate([[0], r, r[-1:]])


def _target_script_routes(doc: bytes) -> np.ndarray:
    return np.concatenate([_script_routes(doc)[1:], [0]]).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# DTP unigram targets (the SentencePiece processor is an input)
# ------------------------------------------------------------------------------------------------


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


def _unigram_annotation(doc: bytes, sp) -> np.ndarray:
    return np.concatenate([[True], unigram_ends(doc, sp), [True]])


# ------------------------------------------------------------------------------------------------
# MAGNET routes
# ------------------------------------------------------------------------------------------------


def _doc_routes(doc: bytes, groups=SCRIPT_GROUPS) -> np.ndarray:
    return np.full(len(doc) + 2, dominant_route(doc, groups), np.int32)


def language_label(source: str, languages) -> int:
    """Index in ``languages`` of the stem of ``source`` ('.../valid/zho-CN.txt' -> 'zho-CN')."""
    stem = os.path.splitext(os.path.basename(source))[0]
    if stem not in languages:
        raise DataError(f"language routing needs documents from files named <lang>.txt with lang in "
                        f"{list(languages)}; got source {source!r}")
    return languages.index(stem)


def _lang_routes(doc: bytes, languages) -> np.ndarray:
    return np.full(len(doc) + 2, language_label(getattr(doc, "source", ""), languages), np.int32)


ANNOTATIONS = {
    "word_starts": (_framed_word_starts, bool),
    "script_routes": (_script_routes, np.int32),
    "target_script_routes": (_target_script_routes, np.int32),
    "unigram_ends": (_unigram_annotation, bool),
    "doc_routes": (_doc_routes, np.int32),
}
for _name, _groups in GROUPINGS.items():
    if _name != "magnet":  # the default grouping: script_routes / doc_routes
        ANNOTATIONS[f"script_routes_{_name}"] = (functools.partial(_script_routes, groups=_groups), np.int32)
        ANNOTATIONS[f"doc_routes_{_name}"] = (functools.partial(_doc_routes, groups=_groups), np.int32)
for _name, _languages in LANGUAGE_SETS.items():
    ANNOTATIONS[f"lang_routes_{_name}"] = (functools.partial(_lang_routes, languages=_languages), np.int32)


def _premium(doc: bytes, model) -> np.ndarray:
    return np.concatenate([[0.0], premium_estimates(bytes(doc) + bytes([EOS]), model)])  # EOS: as a generated one


for _name, _model in INVENTORY_MODELS.items():
    ANNOTATIONS[f"premium_{_name}"] = (functools.partial(_premium, model=_model), np.float32)


def annotate(doc: bytes, names: tuple[str, ...], unigram_sp=None) -> dict[str, np.ndarray]:
    """Per-byte annotations of one whole framed document [BOS, doc..., EOS]: {name: [len(doc) + 2]}.
    ``unigram_sp``: the SentencePiece processor ``unigram_ends`` reads (``train.data.UnigramTargets.processor``)."""
    if "unigram_ends" in names and unigram_sp is None:
        raise DataError("the unigram_ends annotation needs its SentencePiece processor (unigram_sp)")
    out = {}
    for n in names:
        fn, dtype = ANNOTATIONS[n]
        out[n] = np.asarray(fn(doc, unigram_sp) if n == "unigram_ends" else fn(doc)).astype(dtype)
    return out
