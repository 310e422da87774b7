"""Host-side evaluation metrics (numpy): bits per byte, text perturbations, boundary alignment, per-group BPB
and chunk rates, cross-lingual parity. Pure functions over arrays, so each is checked by hand in tests.

Perturbations (robustness, as named in H-Net Table 3 / HAT; our exact definitions, applied per Unicode
character of the decoded text, deterministic under ``seed``):
  uppercase   text.upper()
  randomcase  each character upper- or lower-cased with probability 1/2
  antspeak    upper-cased characters separated by single spaces ("the cat" -> "T H E   C A T")
  drop        each character deleted with probability ``DROP_P`` (0.1)
  repeat      each character, with probability ``REPEAT_P`` (0.2), repeated 1-3 extra times
Invalid UTF-8 survives unchanged (decoded with surrogateescape, never case-mapped or dropped).
"""

from __future__ import annotations

import numpy as np

from models.base import bits_per_byte

DROP_P = 0.1
REPEAT_P = 0.2
PERTURBATIONS = ("antspeak", "drop", "randomcase", "repeat", "uppercase")


def bpb(byte_nll_sum: float, n_bytes: float) -> float:
    """Bits per byte: Σ NLL over real UTF-8 target bytes / (ln 2 · #bytes) (no bytes: the sum itself / ln 2)."""
    return float(bits_per_byte(byte_nll_sum, n_bytes, np))


def perturb(data: bytes, kind: str, seed: int = 0) -> bytes:
    """One of ``PERTURBATIONS`` applied to UTF-8 bytes -> bytes (see the module docstring)."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r} (known: {', '.join(PERTURBATIONS)})")
    chars = list(data.decode("utf-8", errors="surrogateescape"))
    rng = np.random.default_rng([seed, PERTURBATIONS.index(kind)])
    escaped = [0xDC80 <= ord(c) <= 0xDCFF for c in chars]  # raw invalid bytes: left as they are
    up = lambda c, e: c if e else c.upper()  # noqa: E731
    if kind == "uppercase":
        out = [up(c, e) for c, e in zip(chars, escaped)]
    elif kind == "randomcase":
        flips = rng.random(len(chars)) < 0.5
        out = [c if e else (c.upper() if f else c.lower()) for c, e, f in zip(chars, escaped, flips)]
    elif kind == "antspeak":
        out = [" ".join(up(c, e) for c, e in zip(chars, escaped))]
    elif kind == "drop":
        keep = rng.random(len(chars)) >= DROP_P
        out = [c for c, e, k in zip(chars, escaped, keep) if k or e]
    else:  # repeat
        extra = np.where(rng.random(len(chars)) < REPEAT_P, rng.integers(1, 4, len(chars)), 0)
        out = [c * (1 + (0 if e else int(n))) for c, e, n in zip(chars, escaped, extra)]
    return "".join(out).encode("utf-8", errors="surrogateescape")


def boundary_alignment(pred_N: np.ndarray, gold_N: np.ndarray, mask_N: np.ndarray | None = None) -> dict[str, float]:
    """Precision / recall / F1 of predicted chunk starts against reference starts (e.g. HAT word starts)
    over positions where ``mask_N`` is True. All arrays bool, same shape."""
    pred, gold = np.asarray(pred_N, bool), np.asarray(gold_N, bool)
    m = np.ones_like(pred) if mask_N is None else np.asarray(mask_N, bool)
    tp = float(np.sum(pred & gold & m))
    n_pred, n_gold = float(np.sum(pred & m)), float(np.sum(gold & m))
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "n_pred": n_pred, "n_gold": n_gold}


_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True


def skip_leading_whitespace(starts_BxL: np.ndarray, tokens_BxL: np.ndarray, segment_ids_BxL: np.ndarray) -> np.ndarray:
    """Starts moved off ASCII whitespace: a start on a whitespace byte moves to the first non-whitespace
    position after it in the same segment (starts that land together count once). This makes the two word
    conventions comparable: HAT and H-Net put the space at the start of the next word ("␣word"), DTP
    whitespace and SpaceByte at the end of the previous one ("word␣"). bool [B, L]."""
    starts, tok, seg = (np.atleast_2d(np.asarray(a)) for a in (starts_BxL, tokens_BxL, segment_ids_BxL))
    B, L = tok.shape
    ws = _WHITESPACE[tok]  # byte ids 0..255 (BOS/EOS are the invalid-UTF-8 bytes 254/255)
    idx = np.where(ws, L, np.arange(L))
    nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]  # next non-whitespace position at or after t
    b, t = np.nonzero(np.asarray(starts, bool))
    to = nxt[b, t]
    keep = to < L
    b, t, to = b[keep], t[keep], to[keep]
    keep = seg[b, to] == seg[b, t]
    out = np.zeros((B, L), bool)
    out[b[keep], to[keep]] = True
    return out.reshape(np.shape(starts_BxL))


def group_sums(values_N: np.ndarray, groups_N: np.ndarray, weight_N: np.ndarray, n_groups: int) -> np.ndarray:
    """Σ values·weight per group id -> float64 [n_groups] (the accumulator of per-group BPB / rates)."""
    w = np.asarray(weight_N, np.float64).ravel()
    return np.bincount(np.asarray(groups_N).ravel(), weights=np.asarray(values_N, np.float64).ravel() * w,
                       minlength=n_groups)[:n_groups]


def per_group_bpb(nll_sum_G: np.ndarray, n_bytes_G: np.ndarray, names: list[str]) -> dict[str, float]:
    """{group: Σ NLL / (ln 2 · #bytes)} for groups with at least one byte."""
    return {n: bpb(s, c) for n, s, c in zip(names, nll_sum_G, n_bytes_G) if c > 0}


def parity(chunks: dict[str, float], english_bytes: float) -> dict:
    """Segmentation parity on parallel text (MAGNET): chunks per English-equivalent byte per language and
    max/min over languages (1.0 = every language costs the same number of chunks for the same content)."""
    cpe = {lang: c / english_bytes for lang, c in chunks.items()}
    return {"chunks_per_eng_byte": cpe, "max_over_min": max(cpe.values()) / max(min(cpe.values()), 1e-12)}
