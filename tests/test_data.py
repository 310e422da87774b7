"""Byte data pipeline (train/data.py): packing, framing, masks, sources, splits, sharding, resume, shuffle."""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from hnet.bytes import BOS, EOS
from tests.helpers import REPO_ROOT, pydoc_bytes, pydoc_docs, pydoc_text, shakespeare_path
from train import data as D
from train.sources import DataError

L = 32


def _cfg(**kw) -> D.DataConfig:
    base = dict(sources=("builtin:pydoc_topics",), seq_len=L, batch_size=4, shuffle=False, seed=0)
    base.update(kw)
    return D.DataConfig(**base)


def reference_pairs(docs: list[bytes]):
    """Independent (python-loop) framing: per stream index, (byte, doc index, offset, is_frame)."""
    out = []
    for i, d in enumerate(docs):
        ids = [BOS, *d, EOS]
        for j, b in enumerate(ids):
            out.append((b, i, j, j == 0 or j == len(ids) - 1))
    return out


def reference_window(stream, i: int, L: int) -> dict[str, list]:
    """Window i of the packed stream, computed from the per-byte reference (padding: zeros/False)."""
    lo = i * L
    w = collections.defaultdict(list)
    first_doc = stream[lo][1]
    for t in range(L):
        if lo + t + 1 >= len(stream):
            for k in ("inputs", "targets", "segment_ids", "positions"):
                w[k].append(0)
            w["loss_mask"].append(False)
            w["byte_mask"].append(False)
            continue
        x, dx, px, _ = stream[lo + t]
        y, dy, _, fy = stream[lo + t + 1]
        w["inputs"].append(x)
        w["targets"].append(y)
        w["segment_ids"].append(dx - first_doc + 1)
        w["positions"].append(px)
        w["loss_mask"].append(dx == dy)
        w["byte_mask"].append(dx == dy and not fy)
    return w


def _all_eval_windows(cfg, docs):
    return [{k: v[r] for k, v in b.items()} for b in D.iterate_eval_batches(cfg, docs) for r in range(len(b["inputs"]))]


# ------------------------------------------------------------------------------------------ packing


def test_windows_match_independent_reference_packing():
    docs = pydoc_docs(("pass", "continue", "await", "lambda"))
    stream = reference_pairs(docs)
    src = D.WindowSource(docs, L, pad_last=True)
    n_pairs = len(stream) - 1
    assert len(src) == -(-n_pairs // L)
    for i in range(len(src)):
        got, want = src[i], reference_window(stream, i, L)
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask", "byte_mask"):
            np.testing.assert_array_equal(got[k], np.array(want[k], got[k].dtype), err_msg=f"window {i} field {k}")


def test_targets_are_inputs_shifted_across_the_whole_stream():
    docs = pydoc_docs(("pass", "continue", "await"))
    framed = b"".join(bytes([BOS]) + d + bytes([EOS]) for d in docs)
    wins = _all_eval_windows(_cfg(batch_size=4), docs)
    real = [w for w in wins if w["segment_ids"].any()]
    # consecutive windows overlap by one byte: target[-1] of window i == input[0] of window i+1
    for a, b in zip(real, real[1:]):
        assert a["targets"][-1] == b["inputs"][0]
    n = [int((w["segment_ids"] > 0).sum()) for w in real]
    inputs = np.concatenate([w["inputs"][:k] for w, k in zip(real, n)])
    targets = np.concatenate([w["targets"][:k] for w, k in zip(real, n)])
    assert bytes(inputs.astype(np.uint8)) == framed[:-1]
    assert bytes(targets.astype(np.uint8)) == framed[1:]


def test_every_byte_scored_exactly_once_over_eval_batches():
    docs = pydoc_docs(("pass", "continue", "lambda", "await", "numbers"))
    cfg = _cfg(batch_size=4)
    batches = list(D.iterate_eval_batches(cfg, docs))
    assert all(b["inputs"].shape == (4, L) for b in batches)
    assert int(sum(b["byte_mask"].sum() for b in batches)) == sum(len(d) for d in docs)
    # loss_mask scores every byte and every EOS (n + 1 targets per document)
    assert int(sum(b["loss_mask"].sum() for b in batches)) == sum(len(d) + 1 for d in docs)
    # the scored targets, in order, are exactly the documents' bytes
    scored = np.concatenate([b["targets"][b["byte_mask"]] for b in batches]).astype(np.uint8)
    assert bytes(scored) == b"".join(docs)
    # the last batch is padded with empty windows (segment 0, nothing scored)
    last = batches[-1]
    pad_rows = ~last["segment_ids"].any(-1)
    assert not last["loss_mask"][pad_rows].any()


def test_bos_eos_framing_segments_positions_and_masks():
    docs = pydoc_docs(("pass", "continue", "await"))
    wins = _all_eval_windows(_cfg(), docs)
    doc_starts = n_boundaries = 0
    for w in wins:
        seg, pos, x, y = w["segment_ids"], w["positions"], w["inputs"], w["targets"]
        real = seg > 0
        if not real.any():
            continue
        assert seg[0] == 1  # segment ids restart at 1 in every window
        d = np.diff(seg[real])
        assert set(np.unique(d)) <= {0, 1}
        starts = np.flatnonzero(pos[real] == 0)
        # a new segment id exactly where a document starts (position 0 = BOS), except at t=0
        np.testing.assert_array_equal(np.flatnonzero(d == 1) + 1, starts[starts > 0])
        assert (x[real][pos[real] == 0] == BOS).all()
        doc_starts += len(starts)
        # positions count up inside a document
        same = d == 0
        assert (np.diff(pos[real])[same] == 1).all()
        # loss mask is false exactly where the target is the next document's BOS (and on padding)
        boundary = (x == EOS) & (y == BOS)
        np.testing.assert_array_equal(w["loss_mask"], real & ~boundary)
        n_boundaries += int(boundary.sum())
        # EOS targets are scored (loss) but not counted as bytes
        assert not w["byte_mask"][y == EOS].any()
        assert w["loss_mask"][(y == EOS) & real].all()
    assert doc_starts == len(docs)
    assert n_boundaries == len(docs) - 1


def test_raw_254_255_bytes_are_kept_counted_and_scored(tmp_path):
    # real text with its bytes corrupted into 0xFE / 0xFF (invalid UTF-8)
    raw = bytearray(pydoc_bytes("pass"))
    raw[5], raw[40], raw[41] = 0xFE, 0xFF, 0xFE
    raw = bytes(raw)
    p = tmp_path / "raw.bin"
    p.write_bytes(raw)
    docs, stats = D.load_documents(_cfg(sources=(str(p),)))
    assert docs == [raw]
    assert stats.invalid_utf8 == 1 and stats.documents == 1 and stats.bytes == len(raw)
    wins = _all_eval_windows(_cfg(), docs)
    assert sum(int(w["byte_mask"].sum()) for w in wins) == len(raw)
    scored = bytes(np.concatenate([w["targets"][w["byte_mask"]] for w in wins]).astype(np.uint8))
    assert scored == raw
    # framing is by position, not value: the raw 254 inside the doc does not start a segment
    seg = np.concatenate([w["segment_ids"] for w in wins])
    assert set(seg[seg > 0]) == {1}


def test_empty_documents_are_skipped_and_counted(tmp_path):
    text = pydoc_text("assignment")
    p = tmp_path / "a.txt"
    p.write_text(text)
    lines = text.encode().split(b"\n")
    docs, stats = D.load_documents(_cfg(sources=(str(p),), doc_split="line"))
    assert stats.empty_skipped == sum(1 for x in lines if not x) > 0
    assert docs == [x for x in lines if x]
    assert stats.documents == len(docs) and stats.files == 1
    docs, stats = D.load_documents(_cfg(sources=(str(p),), doc_split="blank_line"))
    assert docs == [x for x in text.encode().split(b"\n\n") if x]


def test_jsonl_bad_records_counted_and_skipped(tmp_path):
    a, b = pydoc_text("pass"), pydoc_text("lambda")
    records = [json.dumps({"text": a}), json.dumps({"body": b}), json.dumps({"text": 5}), "{not json",
               json.dumps([a]), "", json.dumps({"text": ""}), json.dumps({"text": b, "id": 3})]
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n".join(records) + "\n")
    docs, stats = D.load_documents(_cfg(sources=(str(p),)))
    assert docs == [a.encode(), b.encode()]
    assert stats.bad_json == 4  # missing field, int field, invalid JSON, non-object
    assert stats.empty_skipped == 1
    assert stats.documents == 2 and stats.files == 1
    docs, stats = D.load_documents(_cfg(sources=(str(p),), jsonl_field="body"))
    assert docs == [b.encode()] and stats.bad_json == 6


def test_directory_and_glob_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    texts = {"b.txt": pydoc_text("pass"), "a.txt": pydoc_text("continue"), "sub/c.txt": pydoc_text("await")}
    for name, t in texts.items():
        (tmp_path / name).write_text(t)
    docs, stats = D.load_documents(_cfg(sources=(str(tmp_path),)))
    assert docs == [texts[k].encode() for k in ("a.txt", "b.txt", "sub/c.txt")]  # recursive, sorted
    assert stats.files == 3
    docs, _ = D.load_documents(_cfg(sources=(str(tmp_path / "*.txt"),)))
    assert docs == [texts["a.txt"].encode(), texts["b.txt"].encode()]
    docs, _ = D.load_documents(_cfg(sources=(str(tmp_path / "**" / "c.txt"),)))
    assert docs == [texts["sub/c.txt"].encode()]
    # several sources concatenate in order
    docs, stats = D.load_documents(_cfg(sources=(str(tmp_path / "sub"), str(tmp_path / "a.txt"))))
    assert docs == [texts["sub/c.txt"].encode(), texts["a.txt"].encode()] and stats.files == 2


def test_missing_paths_raise_data_error_naming_them(tmp_path):
    missing = str(tmp_path / "no_such_corpus.txt")
    with pytest.raises(DataError, match="no_such_corpus.txt"):
        D.load_documents(_cfg(sources=(missing,)))
    with pytest.raises(DataError, match="nothing_here"):
        D.load_documents(_cfg(sources=(str(tmp_path / "nothing_here*.txt"),)))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="emptydir"):
        D.load_documents(_cfg(sources=(str(tmp_path / "emptydir"),)))
    with pytest.raises(DataError, match="builtin"):
        D.load_documents(_cfg(sources=("builtin:no_such_corpus",)))


def test_byte_range_single_document_cut_at_fractions(tmp_path):
    text = pydoc_bytes("assignment")
    p = tmp_path / "one.txt"
    p.write_bytes(text)
    n = len(text)
    parts = []
    for lo, hi in ((0.0, 0.25), (0.25, 0.9), (0.9, 1.0)):
        docs, _ = D.load_documents(_cfg(sources=(str(p),), byte_range=(lo, hi)))
        assert docs == [text[int(lo * n):int(hi * n)]]
        parts += docs
    assert b"".join(parts) == text  # the splits tile the source, no byte lost or duplicated


def test_byte_range_multi_document_assignment_by_start_fraction():
    docs_all, _ = D.load_documents(_cfg())
    total = sum(len(d) for d in docs_all)
    starts = np.cumsum([0] + [len(d) for d in docs_all[:-1]]) / total
    tr, _ = D.load_documents(_cfg(byte_range=(0.0, 0.9)))
    ev, _ = D.load_documents(_cfg(byte_range=(0.9, 1.0)))
    assert tr + ev == docs_all  # every document in exactly one split, order kept
    assert tr == [d for d, s in zip(docs_all, starts) if s < 0.9]
    assert ev and len(ev) < len(docs_all) // 4
    assert 0.8 < sum(map(len, tr)) / total < 0.95


# ----------------------------------------------------------------------------------- sharding


def _window_key(batch, r):
    return bytes(batch["inputs"][r].astype(np.uint8)) + bytes(batch["targets"][r][-1:].astype(np.uint8))


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_process_sharding_disjoint_and_complete(monkeypatch, shuffle):
    docs = pydoc_docs(("pass", "continue", "lambda", "await", "numbers"))
    cfg = _cfg(batch_size=4, shuffle=shuffle, seed=3)
    src = D.WindowSource(docs, L, pad_last=False)
    keys = [_window_key({k: v[None] for k, v in src[i].items()}, 0) for i in range(len(src))]
    assert len(set(keys)) == len(keys)  # precondition: windows are identifiable by content
    index = {k: i for i, k in enumerate(keys)}
    n_batches = len(src) // 4 + 2  # run past one epoch

    def batches_of(pid, pc):
        monkeypatch.setattr(jax, "process_index", lambda: pid)
        monkeypatch.setattr(jax, "process_count", lambda: pc)
        it = D.make_train_iterator(cfg, docs)
        out = [next(it) for _ in range(n_batches)]
        ev = list(D.iterate_eval_batches(cfg, docs))
        return out, ev

    one, ev1 = batches_of(0, 1)
    p0, ev_p0 = batches_of(0, 2)
    p1, ev_p1 = batches_of(1, 2)
    for b1, a, b in zip(one, p0, p1):
        assert a["inputs"].shape == b["inputs"].shape == (2, L) and b1["inputs"].shape == (4, L)
        ia = [index[_window_key(a, r)] for r in range(2)]
        ib = [index[_window_key(b, r)] for r in range(2)]
        i1 = [index[_window_key(b1, r)] for r in range(4)]
        assert not set(ia) & set(ib)
        assert sorted(ia + ib) == sorted(i1)
    # eval: both processes yield the same number of batches; together they cover the global batches
    assert len(ev_p0) == len(ev_p1) == len(ev1)
    for g, a, b in zip(ev1, ev_p0, ev_p1):
        for k in g:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
    assert sum(int(a["byte_mask"].sum() + b["byte_mask"].sum()) for a, b in zip(ev_p0, ev_p1)) == \
        sum(len(d) for d in docs)


def test_batch_not_divisible_by_processes_is_an_error(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match="divisible"):
        D.local_batch_size(4)


# ------------------------------------------------------------------------------- resume, shuffle


def test_iterator_state_resume_gives_same_batches():
    docs = pydoc_docs(("pass", "continue", "lambda", "await"))
    cfg = _cfg(shuffle=True, seed=7)
    it = D.make_train_iterator(cfg, docs)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    it2 = D.make_train_iterator(cfg, docs)
    it2.set_state(state)
    got = [next(it2) for _ in range(2)]
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # the resumed batches are not a restart from the beginning
    assert not np.array_equal(got[0]["inputs"], first[0]["inputs"])
    # the state survives a JSON round trip (what grain's checkpoint handler stores)
    it3 = D.make_train_iterator(cfg, docs)
    it3.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(it3)["inputs"], want[0]["inputs"])


def test_shuffle_is_deterministic_per_seed_and_a_permutation():
    docs = pydoc_docs(("pass", "continue", "lambda", "await", "numbers"))
    src = D.WindowSource(docs, L, pad_last=False)
    n_b = len(src) // 4

    def epoch(**kw):
        it = D.make_train_iterator(_cfg(**kw), docs)
        return np.concatenate([next(it)["inputs"] for _ in range(n_b)])

    a, a2, b = epoch(shuffle=True, seed=0), epoch(shuffle=True, seed=0), epoch(shuffle=True, seed=1)
    ordered = epoch(shuffle=False)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, ordered)
    # unshuffled = windows in stream order; shuffled = a permutation of them
    np.testing.assert_array_equal(ordered, np.stack([src[i]["inputs"] for i in range(n_b * 4)]))
    as_rows = lambda x: sorted(map(bytes, x.astype(np.uint8)))  # noqa: E731
    all_rows = as_rows(np.stack([src[i]["inputs"] for i in range(len(src))]))
    assert set(as_rows(a)) <= set(all_rows) and len(set(as_rows(a))) == n_b * 4


def test_every_epoch_is_a_new_permutation_of_the_windows():
    src = D.WindowSource(pydoc_docs(("pass", "continue", "lambda")), L, pad_last=False)
    n = len(src)
    stream = D.TrainBatches(src, 4, shuffle=True, seed=5)
    flat = [i for k in range(-(-3 * n // 4)) for i in stream.indices(k)]
    epochs = [flat[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    ordered = [i for k in range(-(-n // 4)) for i in D.TrainBatches(src, 4, shuffle=False, seed=5).indices(k)]
    assert ordered[:n] == list(range(n))


def test_max_windows_limits_eval(tmp_path):
    docs = pydoc_docs(("assignment",))
    wins = _all_eval_windows(_cfg(max_windows=5), docs)
    assert sum(bool(w["segment_ids"].any()) for w in wins) == 5


@pytest.mark.shared_data
def test_shakespeare_from_shared_data():
    path = shakespeare_path()
    cfg = _cfg(sources=(path,), byte_range=(0.0, 0.01))
    docs, stats = D.load_documents(cfg)
    with open(path, "rb") as f:
        raw = f.read()
    assert docs == [raw[:int(0.01 * len(raw))]]
    assert stats.invalid_utf8 == 0
    b = next(D.make_train_iterator(dataclasses.replace(cfg, shuffle=True), docs))
    assert b["inputs"].shape == (4, L) and b["byte_mask"].sum() > 0
    assert os.path.basename(path) == "input.txt"


def test_sources_annotations_data_form_layers():
    """train.sources <- train.prepare / train.annotations <- train.data: no cycle, also not inside functions."""
    def train_imports(module: str) -> set[str]:
        tree = ast.parse(open(os.path.join(REPO_ROOT, "train", f"{module}.py")).read())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "train":
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("train."):
                out.add(node.module.split(".")[1])
        return out

    assert train_imports("sources") <= {"storage"}
    assert "data" not in train_imports("annotations") and "data" not in train_imports("prepare")
    assert {"annotations", "prepare", "sources"} <= train_imports("data")


def test_trainer_passes_the_gin_bound_unigram_targets_in(gin_clean):
    """The unigram_ends targets are an input of the data builders (DataConfig.unigram): the trainer's
    Setup.data_config gives gin's train.UnigramTargets when the model reads unigram_ends, nothing else does."""
    import gin

    from train.loop import Setup

    class ReadsUnigramEnds:
        def required_annotations(self):
            return ("unigram_ends",)

    gin.parse_config(["train.UnigramTargets.vocab_size = 300"])
    cfg = Setup(None, None, None, None, None, None, ReadsUnigramEnds()).data_config(_cfg())
    assert cfg.annotations == ("unigram_ends",) and cfg.unigram.vocab_size == 300
    assert _cfg().unigram == D.UnigramTargets() and D.UnigramTargets().vocab_size == 2000
