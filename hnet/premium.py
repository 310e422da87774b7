"""A document's byte premium, estimated causally from its own prefix (issue 19: a catch-all for unseen scripts).

The byte premium π of a text is its UTF-8 bytes per byte of the same content in English. MAGNET's priors
α_r = c / π_r (``hnet.scripts.parity_priors``) need π_r from parallel training text, so a script never seen
in training has none. Its premium is read from the document instead:

    π̂_t = κ̂_t · b_t / c_t,    log κ̂_t = a + b_D log D_t + b_n log n_t

where, over the document's bytes up to t, c_t is the number of characters, b_t = t + 1 the number of bytes,
n_t the number of letters (Unicode category L*) and D_t the number of distinct letters, both among the first
``INVENTORY_LETTERS`` letters. κ = characters per English byte: a script with a large inventory (a
syllabary: hundreds of letters) spends fewer characters on the same content than an alphabet (a few dozen).
(a, b_D, b_n) are fitted by least squares on parallel training text (``fit_inventory_model``), with the
snapshots at several n correcting for how D grows with the sample. Before ``MIN_LETTERS`` letters there is
no estimate (0).

Causal and prefix-stable: a character counts from its last byte on, and bytes that are no valid character
(including a character cut by the end of a prefix) count as neither, so ``premium_estimates(d[:k])`` equals
``premium_estimates(d)[:k]`` (tested).
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

from hnet.scripts import decode_chars

INVENTORY_LETTERS = 500  # D and n count the document's first 500 letters
MIN_LETTERS = 16  # no estimate before 16 letters
SNAPSHOT_LETTERS = (16, 32, 64, 128, 256, INVENTORY_LETTERS)

# (a, b_D, b_n) by fit set: ``fit_inventory_model`` on the named training text (a slow test recomputes them).
#   ntrex_lso: the 18 ntrex128/train files of the leave-scripts-out protocol (all but amh, hye, kat, tha).
INVENTORY_MODELS: dict[str, tuple[float, float, float]] = {
    "ntrex_lso": (0.781601, -0.599253, 0.249049),
}


def _per_byte(count_C: np.ndarray, add_C: np.ndarray, nbytes_C: np.ndarray) -> np.ndarray:
    """Per byte, the count after its character's last byte, before it on the character's earlier bytes."""
    idx = np.repeat(np.arange(len(nbytes_C)), nbytes_C)
    last = np.zeros(idx.size, bool)
    last[np.cumsum(nbytes_C) - 1] = True
    return np.where(last, count_C[idx], count_C[idx] - add_C[idx])


def letter_inventory(doc: bytes, letters: int = INVENTORY_LETTERS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_t letters and D_t distinct letters among the first ``letters`` letters, c_t characters) of the
    document up to every byte t. -> int64 [len(doc)] each."""
    cp_C, escaped_C, nbytes_C = decode_chars(bytes(doc))
    uniq, inverse = np.unique(cp_C, return_inverse=True)
    is_letter_U = np.array([unicodedata.category(chr(c)).startswith("L") for c in uniq.tolist()], bool)
    letter_C = is_letter_U[inverse] & ~escaped_C
    counted_C = letter_C & (np.cumsum(letter_C) <= letters)
    first_C = np.zeros(len(cp_C), bool)
    first_C[np.unique(np.where(counted_C, cp_C, -1), return_index=True)[1]] = True
    first_C &= counted_C
    out = []
    for add_C in (counted_C, first_C, ~escaped_C):
        add_C = add_C.astype(np.int64)
        out.append(_per_byte(np.cumsum(add_C), add_C, nbytes_C))
    return tuple(out)


def premium_estimates(doc: bytes, model: Sequence[float]) -> np.ndarray:
    """π̂_t at every byte of ``doc`` (see the module docstring), 0 before ``MIN_LETTERS`` letters.
    ``model``: (a, b_D, b_n). -> float32 [len(doc)]."""
    a, b_d, b_n = model
    n, d, c = letter_inventory(doc)
    ok = n >= MIN_LETTERS
    n1, d1, c1 = (np.maximum(x, 1) for x in (n, d, c))
    kappa = np.exp(a + b_d * np.log(d1) + b_n * np.log(n1))
    return np.where(ok, kappa * np.arange(1, len(n) + 1) / c1, 0.0).astype(np.float32)


def fit_inventory_model(docs: Sequence[bytes], english_index: int, starts: int = 16,
                        span: int = 8192) -> tuple[float, float, float]:
    """(a, b_D, b_n) by least squares: log κ_l ~ a + b_D log D + b_n log n over snapshots at
    ``SNAPSHOT_LETTERS`` letters of ``starts`` sub-documents of each parallel text l (from evenly spaced line
    starts, ``span`` bytes each), κ_l = characters of l per byte of ``docs[english_index]``."""
    english = len(docs[english_index])
    rows, target = [], []
    for doc in docs:
        kappa = int(np.sum(~decode_chars(bytes(doc))[1])) / english
        lines = np.flatnonzero(np.frombuffer(doc, np.uint8) == 0x0A) + 1
        for s in lines[np.linspace(0, max(len(lines) - 1, 0), starts).astype(int)] if len(lines) else [0]:
            n, d, _ = letter_inventory(doc[s:s + span])
            for k in SNAPSHOT_LETTERS:
                at = np.searchsorted(n, k)  # first byte with k letters
                if at < len(n):
                    rows.append([1.0, np.log(d[at]), np.log(k)])
                    target.append(np.log(kappa))
    coef = np.linalg.lstsq(np.array(rows), np.array(target), rcond=None)[0]
    return tuple(float(x) for x in coef)


__all__ = ["INVENTORY_LETTERS", "MIN_LETTERS", "INVENTORY_MODELS", "letter_inventory", "premium_estimates",
           "fit_inventory_model"]
