"""Causal per-byte Unicode-script routing (MAGNET with per-byte routes instead of per-sequence labels).

Route ids: the position of a group in ``groups`` (an ordered mapping name -> Unicode script names, as
the ``regex`` package spells them in ``\\p{Script=...}``). The group with an empty script list is the
catch-all (exactly one is required): every script not listed elsewhere, including Unknown (unassigned
and private-use code points). Optionally the catch-all is split by UTF-8 length (the byte premium of an
unseen script): a group listing only pseudo-scripts ``'utf8-N'`` (N in 1..4) takes the characters of the
unlisted scripts whose UTF-8 encoding has N bytes; the empty group keeps the lengths no class claims
(e.g. ``NTREX_LSO_UTF8_GROUPS``: 'other2' (), 'other3' ('utf8-3',), 'other4' ('utf8-4',)).
Characters whose script is Common or Inherited (spaces, digits, punctuation, most symbols, combining
marks, the Devanagari danda) have no route of their own: they *inherit* the route in effect, i.e. the
route of the last character that had one (so the spaces of an unseen script take its length class).

Exact per-byte rule (causal: the route of byte t depends only on bytes <= t). The document is read as
a stream of UTF-8 characters; ``r_prev`` is the route of the last completed character with its own
route (``default_route`` at the document start).
  * The last byte of a complete character gets the character's route (``r_prev`` if it inherits), and
    the character then updates ``r_prev``. For 1-byte characters this is the byte itself.
  * An earlier byte of a multi-byte character (the lead byte, and for 3/4-byte characters the next
    ones) has seen only a prefix P of the character. It gets route g if every *assigned* code point
    whose UTF-8 encoding starts with P belongs to group g and none is Common/Inherited (e.g. lead 0xD0
    = U+0400..U+043F -> Cyrillic, and E0 A4 = U+0900..U+093F -> Devanagari); otherwise ``r_prev``
    (e.g. the lead 0xE0 alone, or 0xC3 which also covers × and ÷). If the character then turns out to
    be unassigned, only its last byte says so.
    With length classes the rule is the same, applied to the class routes: every code point under a
    prefix has the length the lead byte announces, so a prefix whose assigned code points are all of
    unlisted scripts gets that length's class (E0 AA = U+0A80..U+0ABF, Gujarati -> the 3-byte class);
    a prefix mixing a class with a listed script or with Common/Inherited still gets ``r_prev``.
  * A byte that is not part of a valid character (stray continuation byte, 0xC0/0xC1/0xF5..0xFF, i.e.
    BOS/EOS too) gets ``r_prev``. The bytes of a character interrupted by such a byte keep the
    prefix routes they got when they arrived; an interrupted character never updates ``r_prev``.

So ``byte_routes(d[:k]) == byte_routes(d)[:k]`` for every byte prefix, including cuts inside a
character (tested).
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import numpy as np
import regex

SCRIPT_GROUPS: dict[str, tuple[str, ...]] = {
    "latin": ("Latin",),
    "cyrl": ("Cyrillic",),
    # MAGNET's "deva" group holds hi, bn and te: it is really "Indic" (all Brahmic scripts of India here)
    "deva": (
        "Devanagari",
        "Bengali",
        "Telugu",
        "Gurmukhi",
        "Gujarati",
        "Oriya",
        "Tamil",
        "Kannada",
        "Malayalam",
        "Sinhala",
    ),
    "other": (),
}

# One group per script of NTREX-128's 22 languages (shared/data/ntrex128): the per-byte route of every
# language's own letters is its script, so no language falls into the catch-all (jpn mixes han + kana).
NTREX_SCRIPT_GROUPS: dict[str, tuple[str, ...]] = {
    "latin": ("Latin",),  # eng spa fra deu vie
    "cyrl": ("Cyrillic",),  # rus ukr bel
    "grek": ("Greek",),
    "arab": ("Arabic",),
    "hebr": ("Hebrew",),
    "deva": ("Devanagari",),  # hin
    "beng": ("Bengali",),
    "telu": ("Telugu",),
    "taml": ("Tamil",),
    "hani": ("Han",),  # zho-CN, jpn kanji
    "kana": ("Hiragana", "Katakana"),  # jpn
    "hang": ("Hangul",),
    "thai": ("Thai",),
    "ethi": ("Ethiopic",),
    "geor": ("Georgian",),
    "armn": ("Armenian",),
    "other": (),
}

# Leave-scripts-out protocol (configs/runs/ntrex_leave_scripts_out.gin): NTREX's groups without the scripts of
# the four held-out languages (kat geor, hye armn, amh ethi, tha thai), which fall to the catch-all: one
# 'other' route (as today), or split by UTF-8 length (hye is 2-byte; kat, amh, tha 3-byte).
LEFT_OUT_SCRIPTS = ("thai", "ethi", "geor", "armn")
NTREX_LSO_GROUPS = {k: v for k, v in NTREX_SCRIPT_GROUPS.items() if k not in LEFT_OUT_SCRIPTS}
NTREX_LSO_UTF8_GROUPS = {**{k: v for k, v in NTREX_LSO_GROUPS.items() if v},
                         "other2": (), "other3": ("utf8-3",), "other4": ("utf8-4",)}

GROUPINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "magnet": SCRIPT_GROUPS, "ntrex": NTREX_SCRIPT_GROUPS, "ntrex_lso": NTREX_LSO_GROUPS,
    "ntrex_lso_utf8": NTREX_LSO_UTF8_GROUPS}

# Language sets for per-document routing by a language label (MAGNET's per-sequence mode with one
# route, and one prior, per language): the label of a document is its file's stem (ntrex128/*/<lang>.txt).
LANGUAGE_SETS: dict[str, tuple[str, ...]] = {
    "ntrex": ("amh", "arb", "bel", "ben", "deu", "ell", "eng", "fra", "heb", "hin", "hye", "jpn", "kat", "kor",
              "rus", "spa", "tam", "tel", "tha", "ukr", "vie", "zho-CN"),
}

_INHERIT = -1
_MAX_CP = 0x110000
# (n bytes per char, code-point range)
_NBYTE_RANGES = ((1, 0x0, 0x7F), (2, 0x80, 0x7FF), (3, 0x800, 0xFFFF), (4, 0x10000, 0x10FFFF))
_LENGTH_CLASSES = {f"utf8-{n}": n for n in (1, 2, 3, 4)}  # pseudo-scripts of the catch-all's length classes


def _utf8_length(cp):
    """UTF-8 bytes of code point(s) ``cp``."""
    return 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)


def decode_chars(data: bytes):
    """Characters of ``data``: code points int64 [C] (an invalid byte b -> U+DC00 + b), which of them are
    invalid bytes bool [C] (valid UTF-8 never encodes U+DC80..U+DCFF), and their UTF-8 lengths int [C]."""
    s = data.decode("utf-8", errors="surrogateescape")
    cp_C = np.frombuffer(s.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)
    escaped_C = (cp_C >= 0xDC80) & (cp_C <= 0xDCFF)
    return cp_C, escaped_C, np.where(escaped_C, 1, _utf8_length(cp_C))


def route_names(groups: Mapping[str, Sequence[str]] = SCRIPT_GROUPS) -> list[str]:
    """Route id -> group name."""
    return list(groups)


def num_routes(groups: Mapping[str, Sequence[str]] = SCRIPT_GROUPS) -> int:
    return len(groups)


def _freeze(groups: Mapping[str, Sequence[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((str(k), tuple(v)) for k, v in groups.items())


@functools.lru_cache(maxsize=8)
def _tables(frozen_groups):
    """Per code point and per partial-character prefix route tables for one grouping (cached, ~1 s).

    Returns (cp_route int8 [0x110000], prefix_tables {(n, k): int8 [#prefixes]}) where -1 = inherit and
    prefix_tables[(n, k)][p] is the route after the first k < n bytes of an n-byte char, indexed by
    p = cp >> 6 * (n - k)."""
    names = [k for k, _ in frozen_groups]
    catch_all = [i for i, (_, scripts) in enumerate(frozen_groups) if not scripts]
    if len(catch_all) != 1:
        raise ValueError(f"exactly one group must have an empty script list (the catch-all), got {names}")
    seen: dict[str, str] = {}
    for name, scripts in frozen_groups:
        if any(sc in _LENGTH_CLASSES for sc in scripts) and not all(sc in _LENGTH_CLASSES for sc in scripts):
            raise ValueError(f"group {name!r} mixes UTF-8 length classes and scripts: {scripts}")
        for sc in scripts:
            if sc in ("Common", "Inherited"):
                raise ValueError("Common/Inherited always inherit the previous route; do not list them")
            if sc in seen:
                raise ValueError(f"script {sc!r} is in groups {seen[sc]!r} and {name!r}")
            seen[sc] = name

    cps_C = np.concatenate([np.arange(0, 0xD800), np.arange(0xE000, _MAX_CP)]).astype(np.int64)
    all_text = "".join(map(chr, cps_C.tolist()))

    def mark(pattern: str) -> np.ndarray:
        m_C = np.zeros(len(cps_C), dtype=bool)
        for mt in regex.finditer(pattern, all_text):
            m_C[mt.start() : mt.end()] = True
        return m_C

    route_C = np.full(len(cps_C), catch_all[0], dtype=np.int8)
    len_C = _utf8_length(cps_C)
    for gi, (_, scripts) in enumerate(frozen_groups):
        for sc in scripts:
            if sc in _LENGTH_CLASSES:
                route_C[len_C == _LENGTH_CLASSES[sc]] = gi  # listed scripts and Common/Inherited override below
    for gi, (_, scripts) in enumerate(frozen_groups):
        if scripts and scripts[0] not in _LENGTH_CLASSES:
            cls = "".join(r"\p{Script=%s}" % sc for sc in scripts)
            route_C[mark("[%s]+" % cls)] = gi
    route_C[mark(r"[\p{Script=Common}\p{Script=Inherited}]+")] = _INHERIT
    assigned_C = mark(r"\p{Assigned}+")

    cp_route = np.full(_MAX_CP, _INHERIT, dtype=np.int8)  # surrogates never occur in valid UTF-8
    cp_route[cps_C] = route_C
    assigned = np.zeros(_MAX_CP, dtype=bool)
    assigned[cps_C] = assigned_C
    assigned[0xD800:0xE000] = False

    prefix_tables = {}
    for n, lo, hi in _NBYTE_RANGES:
        for k in range(1, n):
            shift = 6 * (n - k)
            cp_R = np.arange(lo, hi + 1)
            r_R = cp_route[cp_R].astype(np.int64)
            key_R = (cp_R >> shift) - (lo >> shift)
            nkeys = (hi >> shift) - (lo >> shift) + 1
            a_R = assigned[cp_R]
            # Prefixes with no assigned code point fall back to all of their code points.
            has_assigned = np.bincount(key_R, weights=a_R, minlength=nkeys) > 0
            use_R = a_R | ~has_assigned[key_R]
            big = 1 << 20
            lo_r = np.full(nkeys, big)
            hi_r = np.full(nkeys, -big)
            np.minimum.at(lo_r, key_R[use_R], r_R[use_R])
            np.maximum.at(hi_r, key_R[use_R], r_R[use_R])
            table = np.where((lo_r == hi_r) & (lo_r >= 0), lo_r, _INHERIT).astype(np.int8)
            # pad so that table[p] is indexed by the absolute prefix p = cp >> shift
            prefix_tables[(n, k)] = np.concatenate([np.full(lo >> shift, _INHERIT, np.int8), table])
    return cp_route, prefix_tables


def _char_len(lead: int) -> int:
    """UTF-8 length announced by a lead byte; 0 for bytes that cannot start a character."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _valid_second(lead: int, b: int) -> bool:
    lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))
    return lo <= b <= hi


def _route_invalid_run(run: bytes, r_prev: int, prefix_tables) -> np.ndarray:
    """Streaming rule on bytes that contain no complete valid character. -> int32 [len(run)]."""
    out = np.full(len(run), r_prev, dtype=np.int32)
    i = 0
    while i < len(run):
        n = _char_len(run[i])
        if n < 2:  # stray continuation / invalid lead (ASCII cannot occur here)
            i += 1
            continue
        value = run[i] & (0x7F >> n)
        k = 1
        while True:
            r = prefix_tables[(n, k)][value]
            out[i + k - 1] = r if r >= 0 else r_prev
            if k == n - 1 or i + k >= len(run):
                break
            b = run[i + k]
            ok = _valid_second(run[i], b) if k == 1 else 0x80 <= b <= 0xBF
            if not ok:
                break
            value = (value << 6) | (b & 0x3F)
            k += 1
        i += k
    return out


def byte_routes(
    doc_bytes: bytes,
    groups: Mapping[str, Sequence[str]] = SCRIPT_GROUPS,
    default_route: int = 0,
) -> np.ndarray:
    """Causal route of every byte of one document (see the module docstring). -> int32 [len(doc_bytes)].

    BOS/EOS (0xFE/0xFF) may be included: they are invalid UTF-8 bytes and take the route in effect."""
    data = bytes(doc_bytes)
    cp_route, prefix_tables = _tables(_freeze(groups))
    if not data:
        return np.zeros(0, dtype=np.int32)
    cp_C, escaped_C, nbytes_C = decode_chars(data)
    own_C = np.where(escaped_C, _INHERIT, cp_route[np.where(escaped_C, 0, cp_C)]).astype(np.int64)

    # route in effect *after* each char (forward fill of own routes), and *before* it (r_prev)
    C = len(cp_C)
    idx_C = np.maximum.accumulate(np.where(own_C >= 0, np.arange(C), -1))
    after_C = np.where(idx_C >= 0, own_C[np.maximum(idx_C, 0)], default_route)
    before_C = np.concatenate([[default_route], after_C[:-1]])

    char_of_N = np.repeat(np.arange(C), nbytes_C)
    first_N = np.repeat(np.cumsum(nbytes_C) - nbytes_C, nbytes_C)
    k_N = np.arange(len(data)) - first_N + 1  # bytes of the char seen so far (1..n)
    n_N = nbytes_C[char_of_N]
    cp_N = cp_C[char_of_N]
    known_N = np.where(k_N == n_N, own_C[char_of_N], _INHERIT)
    for n in (2, 3, 4):
        for k in range(1, n):
            sel = (n_N == n) & (k_N == k) & ~escaped_C[char_of_N]
            if sel.any():
                known_N[sel] = prefix_tables[(n, k)][cp_N[sel] >> (6 * (n - k))]
    routes_N = np.where(known_N >= 0, known_N, before_C[char_of_N]).astype(np.int32)

    # invalid bytes: replay the streaming rule on each run of escaped chars (rare)
    if escaped_C.any():
        esc = np.flatnonzero(escaped_C)
        breaks = np.flatnonzero(np.diff(esc) != 1) + 1
        for run_c in np.split(esc, breaks):
            c0, c1 = int(run_c[0]), int(run_c[-1]) + 1
            b0 = int(first_N[np.searchsorted(char_of_N, c0)])
            run = (cp_C[c0:c1] - 0xDC00).astype(np.uint8).tobytes()
            routes_N[b0 : b0 + len(run)] = _route_invalid_run(run, int(before_C[c0]), prefix_tables)
    return routes_N


def dominant_route(doc: bytes, groups: Mapping[str, Sequence[str]] = SCRIPT_GROUPS) -> int:
    """Most frequent causal byte route of ``doc`` under ``groups`` (MAGNET's per-document script route)."""
    r = byte_routes(doc, groups)
    return int(np.bincount(r).argmax()) if len(r) else 0


def route_counts(docs: Sequence[bytes], groups: Mapping[str, Sequence[str]] = SCRIPT_GROUPS) -> np.ndarray:
    """Bytes of each route in each document. -> int64 [len(docs), R]."""
    R = num_routes(groups)
    return np.stack([np.bincount(byte_routes(d, groups), minlength=R) for d in docs]).astype(np.int64)


def parity_priors(counts_LxR: np.ndarray, english_index: int, alpha_english: float = 0.2) -> np.ndarray:
    """Per-route binomial priors α_r that equalise chunks per English-equivalent byte on parallel text.

    counts_LxR: bytes of route r in language l's translation of the same content (``route_counts``), row
    ``english_index`` the English original. With B_l = Σ_r n_lr and E = B_english, every byte of route r
    is worth E/B_l English bytes; route r's premium is π_r = N_r / E_r, N_r = Σ_l n_lr, E_r = Σ_l n_lr E/B_l,
    and α_r = c / π_r, with c set so that English's expected rate Σ_r α_r n_er / E is ``alpha_english``.
    Expected chunks of language l are then Σ_r α_r n_lr ≈ c·E for every language whose routes it does not
    share with languages of another byte premium (e.g. only vie/eng spread the Latin route). Routes absent
    from the text get c. -> float64 [R]."""
    n_LxR = np.asarray(counts_LxR, np.float64)
    B_L = n_LxR.sum(1)
    E = B_L[english_index]
    N_R = n_LxR.sum(0)
    E_R = (n_LxR * (E / np.maximum(B_L, 1.0))[:, None]).sum(0)
    inv_premium_R = np.where(N_R > 0, E_R / np.maximum(N_R, 1.0), 1.0)
    c = alpha_english * E / float(n_LxR[english_index] @ inv_premium_R)
    return c * inv_premium_R


def char_lengths(doc_bytes: bytes) -> np.ndarray:
    """UTF-8 length of the character each byte belongs to (1 for bytes of no valid character). -> int [len]."""
    n_C = decode_chars(bytes(doc_bytes))[2]
    return np.repeat(n_C, n_C)


def route_length_counts(docs: Sequence[bytes], groups: Mapping[str, Sequence[str]] = SCRIPT_GROUPS) -> np.ndarray:
    """Bytes of route r that belong to n-byte characters, summed over ``docs``. -> int64 [R, 4] (column n - 1)."""
    out_Rx4 = np.zeros((num_routes(groups), 4), np.int64)
    for d in docs:
        np.add.at(out_Rx4, (byte_routes(d, groups), char_lengths(d) - 1), 1)
    return out_Rx4


def length_class_priors(priors_R, length_counts_Rx4: np.ndarray, lengths: Sequence[int] = (2, 3, 4)) -> np.ndarray:
    """Priors of the catch-all's UTF-8 length classes, scaled like the seen routes' priors.

    Route r's length is the UTF-8 length that holds most of its bytes (``route_length_counts`` on the
    training text; routes without bytes are not seen). α_n = the mean of the seen α_r of length n weighted
    by their bytes N_r, i.e. the ``parity_priors`` value (same scale c) of those routes merged into one, as
    α_r = c E_r / N_r.
    A length without seen routes takes α_m · m / n from the longest shorter length m that has them (the
    same content in n- instead of m-byte characters). -> float64 [len(lengths)]."""
    a_R = np.asarray(priors_R, np.float64)
    n_Rx4 = np.asarray(length_counts_Rx4, np.float64)
    bytes_R = n_Rx4.sum(1)
    len_R = np.where(bytes_R > 0, n_Rx4.argmax(1) + 1, 0)
    alpha = {}
    for n in range(1, 5):
        w_R = np.where(len_R == n, bytes_R, 0.0)
        if w_R.sum() > 0:
            alpha[n] = float(w_R @ a_R / w_R.sum())
        elif alpha:
            m = max(alpha)
            alpha[n] = alpha[m] * m / n
    if not alpha:
        raise ValueError("no seen route: the counts are all zero")
    first = min(alpha)  # lengths below the shortest seen one: scale it up the same way
    return np.array([alpha.get(n, alpha[first] * first / n) for n in lengths])


def parity_scale(counts_LxR: np.ndarray, english_index: int, alpha_english: float = 0.2) -> float:
    """The scale c of ``parity_priors`` (α_r = c / π_r): the prior it gives a route absent from the text, and the
    prior a route of byte premium π would get as c / π had it been seen."""
    empty = np.zeros((len(counts_LxR), 1), np.asarray(counts_LxR).dtype)
    return float(parity_priors(np.hstack([counts_LxR, empty]), english_index, alpha_english)[-1])


__all__ = ["SCRIPT_GROUPS", "NTREX_SCRIPT_GROUPS", "NTREX_LSO_GROUPS", "NTREX_LSO_UTF8_GROUPS", "GROUPINGS",
           "LANGUAGE_SETS", "route_names", "num_routes", "byte_routes", "decode_chars",
           "route_counts", "parity_priors", "parity_scale", "char_lengths", "route_length_counts",
           "length_class_priors"]
