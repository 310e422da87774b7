"""Tests for hnet/boundary_rules.py and hnet/bytes.py."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnet import boundary_rules as br
from hnet.bytes import BOS, EOS, VOCAB_SIZE


def _words(data: bytes, starts) -> list[bytes]:
    idx = list(np.flatnonzero(starts)) + [len(data)]
    return [data[a:b] for a, b in zip(idx[:-1], idx[1:])]


def _pack(docs: list[bytes], L: int):
    """Frame and pack documents into one row of length L (padding: segment 0, byte 0)."""
    tok, seg = [], []
    for i, d in enumerate(docs, start=1):
        f = [BOS, *d, EOS]
        tok += f
        seg += [i] * len(f)
    assert len(tok) <= L
    tok += [0] * (L - len(tok))
    seg += [0] * (L - len(seg))
    return np.array(tok, np.int32), np.array(seg, np.int32)


# --------------------------------------------------------------------------- bytes.py


def test_byte_vocabulary():
    assert (BOS, EOS, VOCAB_SIZE) == (254, 255, 256)


# --------------------------------------------------------------------------- HAT rule

HAT_CASES = [
    ("Hello, world!", 100, [b"Hello,", b" world!"]),
    ("howAreYou", 100, [b"how", b"Are", b"You"]),
    ("how_are_you", 100, [b"how_", b"are_", b"you"]),
    ("verylongword", 10, [b"verylongwo", b"rd"]),
    ("für", 2, [b"f", "ü".encode(), b"r"]),
    ("a  b\nc", 100, [b"a", b"  ", b"b", b"\n", b"c"]),
]


@pytest.mark.parametrize("text,max_bytes,words", HAT_CASES)
def test_hat_reference_cases(text, max_bytes, words):
    data = text.encode()
    starts = br.hat_word_starts(data, max_bytes)
    assert starts.dtype == bool and starts.shape == (len(data),)
    assert _words(data, starts) == words


def test_hat_invalid_utf8_never_loses_bytes():
    data = b"ab\xe0\xa4 cd\xff\xfe x\x80y\xe4\xb8"
    starts = br.hat_word_starts(data)
    assert b"".join(_words(data, starts)) == data
    # invalid bytes (incl. a truncated char, 0xFE/0xFF) are one-byte words; valid runs split normally
    assert _words(data, starts) == [b"ab", b"\xe0", b"\xa4", b" cd", b"\xff", b"\xfe", b" x", b"\x80", b"y",
                                    b"\xe4", b"\xb8"]
    assert br.hat_word_starts(b"").shape == (0,)


_ALPHABET = list("abcXYZ019 _,.;:'-!?\n\t") + [
    "  ", "\r\n", "ü", "é", "ж", "Д", "क", "ि", "्", "।", "ব", "中", "文", "😀", "🇺", "🇸", "\u0301",
    "\u200d", "—", "«", "×", "'s", "3.5", "e.g.", "verylongwordwithoutspaces"]


def _random_docs(n, seed, max_chars=20):
    rnd = random.Random(seed)
    docs = []
    for _ in range(n):
        d = "".join(rnd.choice(_ALPHABET) for _ in range(rnd.randint(1, max_chars))).encode()
        if rnd.random() < 0.3:  # sprinkle invalid bytes
            i = rnd.randint(0, len(d))
            d = d[:i] + bytes([rnd.choice([0x80, 0xA4, 0xE0, 0xF0, 0xFE, 0xFF, 0xC3])]) + d[i:]
        docs.append(d)
    return docs


@pytest.mark.parametrize("max_bytes", [100, 6, 3])
def test_hat_prefix_stability(max_bytes):
    """mask(d[:k])[:j] == mask(d)[:j], j = k - (unfinished trailing char): exact at char boundaries."""
    n_cut_mid_char = 0
    for d in _random_docs(60, seed=max_bytes):
        full = br.hat_word_starts(d, max_bytes)
        for k in range(1, len(d) + 1):
            p = d[:k]
            tail = br.incomplete_utf8_tail_len(p)
            n_cut_mid_char += tail > 0
            np.testing.assert_array_equal(br.hat_word_starts(p, max_bytes)[: k - tail], full[: k - tail])
    assert n_cut_mid_char > 0


def test_hat_lead_byte_needs_the_whole_char():
    # the reason for the exception above: the lead byte's START bit depends on its continuation bytes
    a, b = "aü".encode(), "a×".encode()  # same lead byte 0xC3
    assert a[1] == b[1] == 0xC3
    assert not br.hat_word_starts(a)[1] and br.hat_word_starts(b)[1]
    b = "a中".encode()
    assert br.incomplete_utf8_tail_len(b[:2]) == 1 and br.incomplete_utf8_tail_len(b[:3]) == 2
    assert br.incomplete_utf8_tail_len(b) == 0 and br.incomplete_utf8_tail_len(b"a\xe0A") == 0


# --------------------------------------------------------------------------- in-graph rules


def _batch():
    t1, s1 = _pack([b"ab cd", "Zürich 中文 x9".encode()], 32)
    t2, s2 = _pack([b"  hello  world", b"x"], 32)
    return jnp.asarray(np.stack([t1, t2])), jnp.asarray(np.stack([s1, s2]))


def test_doc_starts():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(br.doc_starts(seg), [[1, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0]])


def test_offsets_since_start():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(br.offsets_since_start(br.doc_starts(seg)),
                                  [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]])
    starts = jnp.array([[0, 0, 1, 0, 0, 1, 1]], bool)  # positions before the first start count from 0
    np.testing.assert_array_equal(br.offsets_since_start(starts), [[0, 1, 0, 1, 2, 0, 0]])


def _fixed_stride_starts(seg, stride):
    """The model's fixed-stride rule: END bits at offsets ≡ stride-1 of real bytes, converted to START."""
    ends = br.fixed_stride_ends(br.offsets_since_start(br.doc_starts(seg)), stride) & (seg != 0)
    return br.end_to_start(ends, seg)


def test_fixed_stride_resets_at_doc_starts():
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]])
    got = jax.jit(_fixed_stride_starts, static_argnums=1)(seg, 2)
    np.testing.assert_array_equal(got, [[1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0]])
    got3 = _fixed_stride_starts(seg, 3)
    np.testing.assert_array_equal(got3, [[1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(_fixed_stride_starts(seg, 1), (seg != 0) | br.doc_starts(seg))
    with pytest.raises(ValueError):
        br.fixed_stride_ends(seg, 0)


def _ref_spacebyte(tok, seg):
    out = np.zeros(len(tok), bool)

    def sl(x):
        return not (48 <= x <= 57 or 65 <= x <= 90 or 97 <= x <= 122 or 0x80 <= x <= 0xBF)

    for t in range(len(tok)):
        if t == 0 or seg[t] != seg[t - 1]:
            out[t] = True
        elif seg[t] != 0 and sl(tok[t]) and not sl(tok[t - 1]):
            out[t] = True
    return out


def test_spacebyte_starts():
    tok, seg = _batch()
    got = np.asarray(jax.jit(br.spacebyte_starts)(tok, seg))
    for r in range(tok.shape[0]):
        np.testing.assert_array_equal(got[r], _ref_spacebyte(np.asarray(tok[r]), np.asarray(seg[r])))
    # explicit: [BOS] a b ␣ c d [EOS] | [BOS] Z ü r i c h ␣ 中 文 ␣ x 9 [EOS]
    row = got[0]
    assert list(np.flatnonzero(row[:7])) == [0, 3, 6]  # BOS, the space, EOS
    d2 = "Zürich 中文 x9".encode()
    sub = row[7: 7 + len(d2) + 2]
    # 'ü' lead byte 0xC3 is spacelike (opens a patch), its continuation is not; "中文": only the space
    # opens (the lead 0xE4 follows a spacelike byte), "文"'s lead follows a continuation byte -> opens
    expect = {0, 2, 8, 12, 15, 18}
    assert set(np.flatnonzero(sub)) == expect, np.flatnonzero(sub)
    # second row: leading spaces after BOS are part of the BOS run
    assert list(np.flatnonzero(got[1][:17])) == [0, 8, 15, 16]


def test_whitespace_ends_and_converter():
    tok, seg = _batch()
    got = np.asarray(jax.jit(lambda t, s: br.end_to_start(br.whitespace_ends(t), s))(tok, seg))
    ref = np.asarray(br.doc_starts(seg)).copy()
    t_np, s_np = np.asarray(tok), np.asarray(seg)
    ref[:, 1:] |= (t_np[:, :-1] == 32) & (s_np[:, 1:] == s_np[:, :-1]) & (s_np[:, 1:] != 0)
    np.testing.assert_array_equal(got, ref)
    # "ab cd": chunks are "[BOS]ab␣", "cd[EOS]" -> starts at BOS and after the space
    assert list(np.flatnonzero(got[0][:7])) == [0, 4]
    # generic converter: an END at a document's last byte does not leak into the next document
    seg1 = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
    e = jnp.array([[0, 1, 1, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(br.end_to_start(e, seg1), [[1, 0, 1, 1, 0, 0, 1]])
