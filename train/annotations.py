"""Per-document annotations: host-side rules that need the whole document, one value per framed byte
[BOS, doc..., EOS] (``DataConfig.annotations`` names them; ``ANNOTATIONS`` maps name -> (fn, dtype)).

  * ``word_starts`` bool: HAT splitter word starts (``hnet.boundary_rules.hat_word_starts``); BOS and EOS
    start their own one-byte words (HAT, LYT, word-alignment metrics).
  * ``script_routes`` int32: the causal Unicode-script route of each byte (``hnet.scripts``, MAGNET
    grouping); BOS takes route 0, EOS the last byte's route. ``target_script_routes``: the route of each
    position's *target* byte (evaluation: BPB per script).
  * ``unigram_ends`` bool: DTP's unigram END targets from a SentencePiece unigram model trained on the
    training split (``UnigramTargets``: sources, vocab size; gin-configurable as ``train.UnigramTargets``,
    trained once per process and cached). A piece's last byte closes a chunk and the space is attached to
    the word-final piece ("word␣"); BOS and EOS close their own one-byte chunks. A document that is not
    valid UTF-8 falls back to the whitespace rule (e_t = [x_t == ' ']).
  * ``doc_routes`` int32: MAGNET's per-sequence route: the document's dominant script group (most
    frequent causal byte route of the whole document), constant over the document. It stands in for the
    language label (language -> script is many-to-one); it is per-sequence side information, known before
    the document like MAGNET's prepended script token. On NTREX's 22 languages the dominant group is each
    language's script (jpn: kana), i.e. exactly MAGNET's ``language_to_script`` label.
  * ``script_routes_<g>`` / ``doc_routes_<g>``: the same two under another grouping g of
    ``hnet.scripts.GROUPINGS`` (``DTPConfig.script_groups``), e.g. ``script_routes_ntrex``.
  * ``lang_routes_<s>`` int32: the document's language label, constant over the document: the index in
    ``hnet.scripts.LANGUAGE_SETS[s]`` of the stem of the file it came from (``train.data.Document.source``;
    ntrex128/*/<lang>.txt). MAGNET's per-sequence routing with one route per language.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from hnet.boundary_rules import hat_word_starts
from hnet.scripts import GROUPINGS, LANGUAGE_SETS, SCRIPT_GROUPS, byte_routes, dominant_route


def _framed_word_starts(doc: bytes) -> np.ndarray:
    return np.concatenate([[True], hat_word_starts(doc), [True]])


def _script_routes(doc: bytes, groups=SCRIPT_GROUPS) -> np.ndarray:
    r = byte_routes(doc, groups).astype(np.int32)
    return np.concatenate([[0], r, r[-1:]])


def _target_script_routes(doc: bytes) -> np.ndarray:
    return np.concatenate([_script_routes(doc)[1:], [0]]).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# DTP unigram targets
# ------------------------------------------------------------------------------------------------


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

    from train.data import DataConfig, load_documents  # train.data imports this module

    docs, _ = load_documents(DataConfig(sources=cfg.sources, byte_range=cfg.byte_range, doc_split=cfg.doc_split))
    piece = cfg.max_sentence_bytes // 4
    sentences = [line[i:i + piece] for d in docs for line in d.decode("utf-8", errors="ignore").split("\n")
                 for i in range(0, len(line), piece) if line[i:i + piece].strip()]
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
    """The gin-bound ``train.UnigramTargets`` (defaults when gin does not know it)."""
    import gin

    try:
        return gin.get_configurable("train.UnigramTargets")()
    except (ValueError, KeyError):
        return UnigramTargets()


def _unigram_annotation(doc: bytes) -> np.ndarray:
    return np.concatenate([[True], unigram_ends(doc, _active_unigram().processor()), [True]])


# ------------------------------------------------------------------------------------------------
# MAGNET routes
# ------------------------------------------------------------------------------------------------


def _doc_routes(doc: bytes, groups=SCRIPT_GROUPS) -> np.ndarray:
    return np.full(len(doc) + 2, dominant_route(doc, groups), np.int32)


def language_label(source: str, languages) -> int:
    """Index in ``languages`` of the stem of ``source`` ('.../valid/zho-CN.txt' -> 'zho-CN')."""
    from train.data import DataError  # train.data imports this module

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
