"""Issue 19 analysis (nothing is trained): could a per-document byte-premium estimate, instead of one prior per
UTF-8 length, give the catch-all of the leave-scripts-out protocol a parity ≤ 1.6?

    .venv/bin/python benchmarks/premium_estimator.py [--out premium_estimator.json]

Estimator (causal per byte, from the document prefix only): r_t = (bytes so far / ASCII spaces so far) /
English's bytes per space-delimited word; log π̂_t = a · log r_t, with a fitted by least squares (through
English: r = 1 -> π = 1) on the byte premiums of the *training* files of the seen languages that put spaces
between words (r < ``--spaceless``); the held-out languages' text is never used. Until ``--min_words`` spaces
are seen, or for text without spaces (r ≥ ``--spaceless``), a byte keeps the prior of its route under the
UTF-8 length classes (``NTREX_LSO_UTF8_GROUPS``, priors as configs/magnet_lso_utf8_tiny.gin); otherwise a
byte routed to a length class gets α_t = α_eng / π̂_t instead.

A second estimator reads the script's inventory instead of its spaces: D = distinct letters (Unicode L*)
among the document's first ``--letters`` letters, κ = characters per English byte with log κ = a' + b' log D
fitted on the 18 seen training files (alphabets: a few dozen letters, κ ≈ 1; syllabaries and logographs:
hundreds, κ < 1), and π̂_t = (bytes so far / characters so far) · κ once those letters are complete.

Output: per held-out language its true premium on the valid files, the whole-file estimate, and the
prior-implied chunks per English-equivalent byte (Σ_t α_t over the file / English's bytes) with the UTF-8
classes and with the estimator; the seen languages' parity priors (``parity_priors`` on the 18 training
files) give theirs, and the overall prior-implied parity is max / min over all 22.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def word_ratio(doc: bytes, eng_bytes_per_word: float) -> tuple[np.ndarray, np.ndarray]:
    """Per byte, causal: (spaces so far, r_t = bytes so far per space so far over English's bytes per word;
    inf before the first space)."""
    spaces = np.cumsum(np.frombuffer(doc, np.uint8) == 0x20)
    n = np.arange(1, len(doc) + 1)
    with np.errstate(divide="ignore"):
        return spaces, n / spaces / eng_bytes_per_word


def inventory(doc: bytes, letters: int) -> tuple[int, int]:
    """(distinct letters among the first ``letters`` letters of ``doc``, byte index where the last of them ends,
    or -1 when the document has fewer)."""
    import regex

    seen, n, end = set(), 0, 0
    for c in doc.decode("utf-8", errors="surrogateescape"):
        end += len(c.encode("utf-8", errors="surrogateescape"))
        if regex.match(r"\p{L}", c):
            seen.add(c)
            n += 1
            if n == letters:
                return len(seen), end - 1
    return len(seen), -1


def chars_per_byte(doc: bytes) -> np.ndarray:
    """Characters so far per byte so far, at every byte (a character counts from its lead byte)."""
    return np.cumsum((np.frombuffer(doc, np.uint8) & 0xC0) != 0x80) / np.arange(1, len(doc) + 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min_words", type=int, default=8)
    ap.add_argument("--spaceless", type=float, default=6.0, help="r at or above this: no word statistic")
    ap.add_argument("--letters", type=int, default=500, help="letters that define a document's inventory")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from hnet import scripts
    from train.sources import shared_path

    def read(split, lang):
        with open(shared_path("ntrex128", split, f"{lang}.txt"), "rb") as f:
            return f.read()

    langs = scripts.LANGUAGE_SETS["ntrex"]
    held = ("amh", "hye", "kat", "tha")
    seen = [g for g in langs if g not in held]
    train = {g: read("train", g) for g in langs}
    valid = {g: read("valid", g) for g in langs}
    bpw = {s: len(d["eng"]) / len(d["eng"].split(b" ")) for s, d in (("train", train), ("valid", valid))}

    # the seen routes' priors and the length classes, as the shipped LSO configs compute them
    groups, utf8 = scripts.NTREX_LSO_GROUPS, scripts.NTREX_LSO_UTF8_GROUPS
    counts = scripts.route_counts([train[g] for g in seen], groups)
    priors = scripts.parity_priors(counts, seen.index("eng"))
    cls = scripts.length_class_priors(priors, scripts.route_length_counts([train[g] for g in seen], groups))
    seen_routes = [k for k in groups if groups[k]]
    priors_utf8 = np.array([priors[list(groups).index(k)] for k in seen_routes] + list(cls))  # utf8's route order
    a_eng = float(priors[list(groups).index("latin")])

    # premium model on the seen spaced languages' training files
    prem = {g: len(train[g]) / len(train["eng"]) for g in seen}
    r_file = {g: len(train[g]) / len(train[g].split(b" ")) / bpw["train"] for g in seen}
    fit = [g for g in seen if r_file[g] < args.spaceless and g != "eng"]
    x, y = np.log([r_file[g] for g in fit]), np.log([prem[g] for g in fit])
    a = float(x @ y / (x @ x))
    resid = y - a * x
    inv = {g: inventory(train[g], args.letters)[0] for g in seen}
    kappa = {g: prem[g] * chars_per_byte(train[g])[-1] for g in seen}  # characters per English byte
    xi, yi = np.log([inv[g] for g in seen]), np.log([kappa[g] for g in seen])
    b_inv, a_inv = np.polyfit(xi, yi, 1)
    resid_inv = yi - (a_inv + b_inv * xi)

    # prior-implied chunks per English-equivalent byte on the valid files
    E = len(valid["eng"])
    implied = {g: float(scripts.route_counts([valid[g]], groups)[0] @ priors) / E for g in seen}
    rows = []
    for g in held:
        doc = valid[g]
        route_t = scripts.byte_routes(doc, utf8)
        alpha_cls = priors_utf8[route_t]  # the UTF-8 class model: seen routes and class routes
        is_class = route_t >= len(seen_routes)  # routed to a UTF-8 length class (the catch-all)
        spaces, r_t = word_ratio(doc, bpw["valid"])
        use = is_class & (spaces >= args.min_words) & (r_t < args.spaceless)
        alpha_est = np.where(use, a_eng / np.exp(a * np.log(np.where(use, r_t, 1.0))), alpha_cls)
        D, t0 = inventory(doc, args.letters)
        use_inv = is_class & (np.arange(len(doc)) >= t0) & (t0 >= 0)
        pi_inv = np.exp(a_inv + b_inv * np.log(D)) / chars_per_byte(doc)
        alpha_inv = np.where(use_inv, a_eng / pi_inv, alpha_cls)
        r_whole = len(doc) / len(doc.split(b" ")) / bpw["valid"]
        rows.append({"lang": g, "premium": len(doc) / E, "premium_estimate_whole_file": float(r_whole ** a),
                     "bytes_with_estimate": float(use.mean()),
                     "implied_utf8_classes": float(alpha_cls.sum() / E), "implied_estimator": float(alpha_est.sum() / E),
                     "inventory": D, "premium_estimate_inventory": float(pi_inv[-1]),
                     "implied_inventory": float(alpha_inv.sum() / E)})

    def parity(key):
        v = list(implied.values()) + [r[key] for r in rows]
        return max(v) / min(v)

    print(f"premium model: log premium = {a:.3f} log(bytes per word / English's), fitted on {len(fit)} seen "
          f"training files (residual sd {resid.std():.3f})")
    print(f"inventory model: log κ = {a_inv:.3f} + {b_inv:.3f} log D, fitted on {len(seen)} seen training files "
          f"(residual sd {resid_inv.std():.3f}, largest {np.abs(resid_inv).max():.3f}: "
          f"{seen[int(np.abs(resid_inv).argmax())]})")
    print("| lang | premium (valid) | π̂ words (whole file) | bytes with a word estimate | D | π̂ inventory (end) | "
          "prior-implied chunks/eng-byte: UTF-8 classes | words | inventory |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lang']} | {r['premium']:.2f} | {r['premium_estimate_whole_file']:.2f} | "
              f"{r['bytes_with_estimate']:.0%} | {r['inventory']} | {r['premium_estimate_inventory']:.2f} | "
              f"{r['implied_utf8_classes']:.4f} | {r['implied_estimator']:.4f} | {r['implied_inventory']:.4f} |")
    lo, hi = min(implied, key=implied.get), max(implied, key=implied.get)
    print(f"seen (18): prior-implied {implied[lo]:.4f} ({lo}) .. {implied[hi]:.4f} ({hi}), parity {implied[hi] / implied[lo]:.2f}")
    print(f"overall (22) prior-implied parity: UTF-8 classes {parity('implied_utf8_classes'):.2f}, "
          f"words {parity('implied_estimator'):.2f}, inventory {parity('implied_inventory'):.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"slope": a, "fit_languages": fit, "rows": rows, "seen_implied": implied,
                       "parity_utf8_classes": parity("implied_utf8_classes"),
                       "parity_estimator": parity("implied_estimator"), "inventory_model": [a_inv, b_inv],
                       "parity_inventory": parity("implied_inventory"), "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
