"""Issue 19 analysis (nothing is trained): could a per-document byte-premium estimate, instead of one prior per
UTF-8 length, give the catch-all of the leave-scripts-out protocol a parity ≤ 1.6? (It led to hnet/premium.py.)

    .venv/bin/python benchmarks/premium_estimator.py [--out premium_estimator.json]

Estimator (causal per byte, from the document prefix only): r_t = (bytes so far / ASCII spaces so far) /
English's bytes per space-delimited word; log π̂_t = a · log r_t, with a fitted by least squares (through
English: r = 1 -> π = 1) on the byte premiums of the *training* files of the seen languages that put spaces
between words (r < ``--spaceless``); the held-out languages' text is never used. Until ``--min_words`` spaces
are seen, or for text without spaces (r ≥ ``--spaceless``), a byte keeps the prior of its route under the
UTF-8 length classes (``NTREX_LSO_UTF8_GROUPS``, priors as configs/magnet_lso_utf8_tiny.gin); otherwise a
byte routed to a length class gets α_t = c / π̂_t instead, c the scale of ``parity_priors`` on the 18 training
files (``hnet.scripts.parity_scale``): the prior a seen route of premium π gets is c / π. (Session 7 used
α_eng = 0.2 in place of c = 0.246, i.e. English's own rate instead of the seen routes' scale: every estimate
came out 19 % lower, and kat fell below English.)

A second estimator reads the script's inventory instead of its spaces: D = distinct letters (Unicode L*)
among the document's first ``--letters`` letters, κ = characters per English byte with log κ = a' + b' log D
fitted on the 18 seen training files (alphabets: a few dozen letters, κ ≈ 1; syllabaries and logographs:
hundreds, κ < 1), and π̂_t = (bytes so far / characters so far) · κ once those letters are complete.

``hnet.premium`` is the second estimator as the model reads it, causal from the 16th letter on: log κ =
a + b_D log D_t + b_n log n_t over the letters so far (n_t ≤ 500), fitted on snapshots of the training files.

Which to trust is checked without the held-out text: every seen language outside Latin is treated in turn as
unseen (its script's languages dropped from both fits), and its parity prior α = c / premium is predicted by
log α = w log α_class + (1 − w) log α_inventory, for w in 0, 0.1, ..., 1 (α_class: the UTF-8 length-class prior
of its length, ``length_class_priors`` of the remaining routes; α_inventory = c / π̂ of ``hnet.premium``,
refitted). The w with the least RMS log error is then applied to the held-out languages.

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
from hnet import premium, scripts  # noqa: E402


def word_ratio(doc: bytes, eng_bytes_per_word: float) -> tuple[np.ndarray, np.ndarray]:
    """Per byte, causal: (spaces so far, r_t = bytes so far per space so far over English's bytes per word;
    inf before the first space)."""
    spaces = np.cumsum(np.frombuffer(doc, np.uint8) == 0x20)
    n = np.arange(1, len(doc) + 1)
    with np.errstate(divide="ignore"):
        return spaces, n / spaces / eng_bytes_per_word


def inventory(doc: bytes, letters: int) -> tuple[int, int, np.ndarray]:
    """(distinct letters among the first ``letters`` letters of ``doc``, byte index where the last of them ends
    or -1 when the document has fewer, characters so far (at least 1) per byte so far at every byte), from
    ``hnet.premium.letter_inventory`` (a character counts from its last byte on)."""
    n, d, c = premium.letter_inventory(doc, letters)
    end = int(np.searchsorted(n, letters))
    return int(d[-1]), (end if end < len(n) else -1), np.maximum(c, 1) / np.arange(1, len(doc) + 1)


def utf8_length(doc: bytes) -> int:
    """The UTF-8 character length that holds most of ``doc``'s bytes."""
    lens = scripts.char_lengths(doc)
    return int(np.bincount(lens, minlength=5)[1:].argmax() + 1)


def class_prior(docs: list[bytes], length: int) -> tuple[float, float]:
    """(length-class prior of UTF-8 length ``length``, scale c) with ``docs`` (English first) as the seen text."""
    groups = scripts.NTREX_SCRIPT_GROUPS
    counts = scripts.route_counts(docs, groups)
    priors = scripts.parity_priors(counts, 0)
    cls = scripts.length_class_priors(priors, scripts.route_length_counts(docs, groups), (length,))
    return float(cls[0]), scripts.parity_scale(counts, 0)


def leave_one_script_out(train: dict, seen: list, weights) -> dict:
    """Per seen non-Latin language g, fitted without g's script: (α, α_class, α_inventory) and, per weight w,
    the log error of α_w = α_class^w · α_inventory^(1-w). α = c / premium, the prior ``parity_priors`` would
    give g's script had it been seen (c: its scale on the other languages); α_inventory = c / π̂ with π̂ the
    estimate of ``hnet.premium`` (its model refitted without g's script) at the end of g's training file."""
    groups = scripts.NTREX_SCRIPT_GROUPS
    names = list(groups)
    script = {g: names[scripts.dominant_route(train[g], groups)] for g in seen}
    rows = []
    for g in (g for g in seen if script[g] != "latin"):
        fit = ["eng"] + [h for h in seen if script[h] != script[g] and h != "eng"]
        model = premium.fit_inventory_model([train[h] for h in fit], 0)
        alpha_cls, c = class_prior([train[h] for h in fit], utf8_length(train[g]))
        alpha_inv = c / float(premium.premium_estimates(train[g], model)[-1])
        true = c * len(train["eng"]) / len(train[g])
        rows.append({"lang": g, "script": script[g], "alpha": true, "alpha_class": alpha_cls,
                     "alpha_inventory": float(alpha_inv),
                     "log_error": {f"{w:.1f}": float(w * np.log(alpha_cls) + (1 - w) * np.log(alpha_inv) - np.log(true))
                                   for w in weights}})
    rms = {w: float(np.sqrt(np.mean([r["log_error"][w] ** 2 for r in rows]))) for w in rows[0]["log_error"]}
    return {"rows": rows, "rms_log_error": rms, "best_weight": float(min(rms, key=rms.get))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min_words", type=int, default=8)
    ap.add_argument("--spaceless", type=float, default=6.0, help="r at or above this: no word statistic")
    ap.add_argument("--letters", type=int, default=500, help="letters that define a document's inventory")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

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
    c = scripts.parity_scale(counts, seen.index("eng"))  # a held-out route of premium π gets c / π, as a seen one would

    # premium model on the seen spaced languages' training files
    prem = {g: len(train[g]) / len(train["eng"]) for g in seen}
    r_file = {g: len(train[g]) / len(train[g].split(b" ")) / bpw["train"] for g in seen}
    fit = [g for g in seen if r_file[g] < args.spaceless and g != "eng"]
    x, y = np.log([r_file[g] for g in fit]), np.log([prem[g] for g in fit])
    a = float(x @ y / (x @ x))
    resid = y - a * x
    stats = {g: inventory(train[g], args.letters) for g in seen}
    inv = {g: stats[g][0] for g in seen}
    kappa = {g: prem[g] * stats[g][2][-1] for g in seen}  # characters per English byte
    xi, yi = np.log([inv[g] for g in seen]), np.log([kappa[g] for g in seen])
    b_inv, a_inv = np.polyfit(xi, yi, 1)
    resid_inv = yi - (a_inv + b_inv * xi)

    loo = leave_one_script_out(train, seen, np.linspace(0, 1, 11))
    w = loo["best_weight"]

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
        alpha_est = np.where(use, c / np.exp(a * np.log(np.where(use, r_t, 1.0))), alpha_cls)
        D, t0, cpb = inventory(doc, args.letters)
        use_inv = is_class & (np.arange(len(doc)) >= t0) & (t0 >= 0)
        pi_inv = np.exp(a_inv + b_inv * np.log(D)) / cpb
        alpha_inv = np.where(use_inv, c / pi_inv, alpha_cls)
        pi_model = premium.premium_estimates(doc, premium.INVENTORY_MODELS["ntrex_lso"])  # what the model reads
        use_model = is_class & (pi_model > 0)
        alpha_model = np.clip(c / np.where(use_model, pi_model, 1.0), 1e-3, 0.5)
        alpha_cv = np.where(use_model, alpha_cls ** w * alpha_model ** (1 - w), alpha_cls)
        r_whole = len(doc) / len(doc.split(b" ")) / bpw["valid"]
        rows.append({"lang": g, "premium": len(doc) / E, "premium_estimate_whole_file": float(r_whole ** a),
                     "bytes_with_estimate": float(use.mean()),
                     "implied_utf8_classes": float(alpha_cls.sum() / E), "implied_estimator": float(alpha_est.sum() / E),
                     "inventory": D, "premium_estimate_inventory": float(pi_inv[-1]),
                     "implied_inventory": float(alpha_inv.sum() / E), "premium_estimate_model": float(pi_model[-1]),
                     "implied_cv": float(alpha_cv.sum() / E)})

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
    print("\nleave one script out (seen languages only): α predicted as α_class^w · α_inventory^(1-w)\n"
          "| lang | script | α (true) | α_class | α_inventory |\n|---|---|---|---|---|")
    for r in loo["rows"]:
        print(f"| {r['lang']} | {r['script']} | {r['alpha']:.3f} | {r['alpha_class']:.3f} | {r['alpha_inventory']:.3f} |")
    print("RMS log error by w: " + ", ".join(f"{k}: {v:.3f}" for k, v in loo["rms_log_error"].items()))
    print(f"chosen w = {w:.1f}, with hnet.premium's π̂ (what configs/magnet_lso_premium_tiny.gin reads, from 16 "
          "letters on): " + ", ".join(f"{r['lang']} π̂ {r['premium_estimate_model']:.2f} -> {r['implied_cv']:.4f}"
                                      for r in rows) + f"; overall (22) prior-implied parity {parity('implied_cv'):.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"slope": a, "fit_languages": fit, "rows": rows, "seen_implied": implied,
                       "parity_utf8_classes": parity("implied_utf8_classes"),
                       "parity_estimator": parity("implied_estimator"), "inventory_model": [a_inv, b_inv],
                       "parity_inventory": parity("implied_inventory"), "leave_one_script_out": loo,
                       "parity_cv": parity("implied_cv"), "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
