"""Evaluation of a model in eval mode: exact bits per byte, chunk-boundary pictures, per-corpus and
per-language metrics. The trainer (``train.loop``), ``train.evaluate``, ``train.multilingual_eval`` and the
sweep (through ``train.evaluate``) all use this module; ``setup`` is a ``train.loop.Setup``.

Every reduction runs one pass over the windows of a split (``eval_batches``); BPB is always
``train.metrics.bpb``: Σ NLL over real UTF-8 target bytes / (ln 2 · #bytes).

  evaluate            the trainer's eval: bpb, loss (mean NLL per scored target), n_bytes, n_masked_by_model
                      and the model's own metrics (mean over the batches where defined)
  evaluate_corpus     per corpus, the metrics of ``train.evaluate``: bpb, n_masked_by_model, bpb_by_script,
                      bytes_per_chunk (per boundary stage: real input bytes, BOS/EOS excluded, / chunk starts
                      among them), chunk_rate_by_script, word_alignment (each stage's starts against the HAT
                      splitter's word starts, exact and ``skip_ws``), boundary_example
  robustness          BPB of a corpus head, clean and under each of ``train.metrics.PERTURBATIONS``
  evaluate_languages  per language of a parallel-text directory (one ``<lang>.txt`` document per language):
                      bpb, bytes_per_chunk / boundary_rate (the model's ``chunk_stage`` starts over non-pad
                      positions; one chunk per byte without boundaries), chunks_per_eng_byte; per script (sums,
                      then ratios) and the parity max/min over languages (``train.multilingual_eval``)
  mark_boundaries / log_boundaries   text with '|' before each chunk start (TensorBoard, eval reports)
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from hnet import sharding
from hnet.bytes import BOS
from hnet.scripts import GROUPINGS, dominant_route, route_names
from models.base import cross_entropy_sums, masked_by_model, token_nll
from train import data as data_lib
from train import metrics as M
from train.logger import MetricWriter
from train.sources import DataError, Document, shared_path
from train.step import eval_forward, make_eval_step

EVAL_ANNOTATIONS = ("word_starts", "script_routes", "target_script_routes")  # what evaluate_corpus reads
EXAMPLE_BYTES = 240  # bytes of a corpus shown with its chunk starts
MAGNET_LANGUAGES = ("eng", "spa", "fra", "rus", "ukr", "bel", "hin", "ben", "tel")  # Ahia et al. 2024


def eval_batches(setup, cfg: data_lib.DataConfig, docs, fn: Callable) -> Iterator[tuple[dict, object]]:
    """(process-local batch, host copy of ``fn(params, rest, global batch)``) for every window of ``docs``
    exactly once, under the setup's mesh."""
    with sharding.mesh_context(setup.mesh):
        for local in data_lib.iterate_eval_batches(cfg, docs):
            batch = sharding.global_batch_from_local(setup.mesh, local)
            yield local, jax.device_get(fn(setup.state.params, setup.state.rest, batch))


def add_sums(totals: dict[str, float], sums: dict) -> dict[str, float]:
    """``totals`` += ``sums`` key by key (as Python floats)."""
    for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def mean_of_defined(values: list[float]) -> float:
    """Mean of a per-batch model metric over the batches where it is defined (nan marks a batch where it is
    not, e.g. a script route with no bytes); nan if it never is."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


# ------------------------------------------------------------------------------------------------
# The trainer's eval
# ------------------------------------------------------------------------------------------------


def make_eval_fn(setup):
    return jax.jit(make_eval_step(setup.graphdef))


def evaluate(setup, eval_cfg: data_lib.DataConfig, docs, eval_fn=None) -> dict[str, float]:
    """Exact bits-per-byte over every window of a split, the mean loss and the model's metrics."""
    totals: dict[str, float] = {}
    extras: dict[str, list[float]] = {}
    for _, (sums, extra) in eval_batches(setup, eval_cfg, docs, eval_fn or make_eval_fn(setup)):
        add_sums(totals, sums)
        for k, v in extra.items():
            extras.setdefault(k, []).append(float(v))
    out = {
        "bpb": M.bpb(totals["byte_nll_sum"], totals["n_bytes"]),
        "loss": totals["nll_sum"] / max(totals["n_targets"], 1.0),
        "n_bytes": totals["n_bytes"],
        "n_masked_by_model": totals["n_masked_by_model"],
    }
    out.update({k: mean_of_defined(v) for k, v in extras.items()})
    return out


# ------------------------------------------------------------------------------------------------
# Boundary pictures
# ------------------------------------------------------------------------------------------------


def mark_boundaries(tokens: np.ndarray, starts: np.ndarray) -> str:
    """Bytes as text, every character whole: '|' before a character whose first byte starts a chunk, '¦' before
    one that a chunk starts inside (at a later byte of it); bytes that are not UTF-8 show as U+FFFD. No mark
    before the first byte."""
    data = bytes(np.asarray(tokens).astype(np.uint8).tolist())
    starts = np.asarray(starts, bool)
    out, i = [], 0
    for ch in data.decode("utf-8", errors="surrogateescape"):
        invalid = "\udc80" <= ch <= "\udcff"  # one byte that is not part of a character
        n = 1 if invalid else len(ch.encode("utf-8"))
        out.append(("|" if starts[i] and i > 0 else "") + ("¦" if starts[i + 1:i + n].any() else "")
                   + ("\ufffd" if invalid else ch))
        i += n
    return "".join(out)


def make_boundaries_fn(setup):
    """jit (params, rest, batch) -> {stage: chunk starts [B, L]}; built once per run (no recompilation)."""
    return jax.jit(lambda params, rest, batch: eval_forward(setup.graphdef, params, rest, batch).boundaries)


def log_boundaries(setup, writer: MetricWriter, step: int, local_batch: dict, boundaries_fn, n_bytes: int = 400):
    """TensorBoard: one validation text with each stage's chunk starts marked, and chunk-length histograms.
    ``boundaries_fn``: ``make_boundaries_fn(setup)``."""
    batch = sharding.global_batch_from_local(setup.mesh, local_batch)
    with sharding.mesh_context(setup.mesh):
        marks = jax.device_get(boundaries_fn(setup.state.params, setup.state.rest, batch))
    real = local_batch["segment_ids"] > 0
    lines = []
    for name, starts in sorted(marks.items()):
        starts = np.asarray(starts) & real
        n = min(n_bytes, int(real[0].sum()))
        lines.append(f"[{name}] " + mark_boundaries(local_batch["inputs"][0, :n], starts[0, :n]))
        pos = np.flatnonzero(starts.reshape(-1))
        writer.histogram(step, f"chunk_length/{name}", np.diff(pos)[np.diff(pos) > 0])
    if lines:
        writer.text(step, "boundaries", "\n".join(lines))


# ------------------------------------------------------------------------------------------------
# Per corpus: BPB by script, chunks, word alignment, robustness
# ------------------------------------------------------------------------------------------------


def make_detail_fn(graphdef):
    """jit: (params, rest, batch) -> per-position NLL, byte weights and every stage's chunk starts."""

    @jax.jit
    def detail(params, rest, batch):
        out = eval_forward(graphdef, params, rest, batch)
        nll_BxL, w_BxL, byte_w_BxL = token_nll(out, batch)
        return {"nll": nll_BxL, "byte_w": byte_w_BxL, "boundaries": out.boundaries,
                "n_masked_by_model": masked_by_model(batch, w_BxL)}

    return detail


def evaluate_corpus(setup, cfg: data_lib.DataConfig, docs: list[bytes], detail_fn=None) -> dict:
    """The per-corpus metrics of the module docstring over every window of ``docs``."""
    detail_fn = detail_fn or make_detail_fn(setup.graphdef)
    cfg = data_lib.with_annotations(setup.data_config(cfg), EVAL_ANNOTATIONS)
    names = route_names()
    G = len(names)
    nll_G, bytes_G = np.zeros(G), np.zeros(G)
    stage: dict[str, dict] = {}
    example: dict[str, str] = {}
    n_masked = 0.0
    for local, d in eval_batches(setup, cfg, docs, detail_fn):
        n_masked += float(d["n_masked_by_model"])
        nll_G += M.group_sums(d["nll"], local["target_script_routes"], d["byte_w"], G)
        bytes_G += M.group_sums(1.0, local["target_script_routes"], d["byte_w"], G)
        real = (local["segment_ids"] > 0) & (local["inputs"] < BOS)  # input bytes, frames excluded
        gold_ws = M.skip_leading_whitespace(local["word_starts"], local["inputs"], local["segment_ids"])[real]
        for name, starts in d["boundaries"].items():
            s = stage.setdefault(name, {"starts_G": np.zeros(G), "real_G": np.zeros(G), "pred": [], "gold": [],
                                        "pred_ws": [], "gold_ws": []})
            s["starts_G"] += M.group_sums(np.asarray(starts), local["script_routes"], real, G)
            s["real_G"] += M.group_sums(1.0, local["script_routes"], real, G)
            s["pred"].append(np.asarray(starts)[real])
            s["gold"].append(local["word_starts"][real])
            s["pred_ws"].append(M.skip_leading_whitespace(starts, local["inputs"], local["segment_ids"])[real])
            s["gold_ws"].append(gold_ws)
            if name not in example:  # first window, after its BOS
                n = min(EXAMPLE_BYTES, int(real[0].sum()))
                example[name] = mark_boundaries(local["inputs"][0, 1:1 + n], np.asarray(starts)[0, 1:1 + n])
    out = {"bpb": M.bpb(nll_G.sum(), bytes_G.sum()), "n_bytes": float(bytes_G.sum()),
           "n_masked_by_model": n_masked,
           "bpb_by_script": M.per_group_bpb(nll_G, bytes_G, names),
           "bytes_by_script": {n: float(c) for n, c in zip(names, bytes_G) if c > 0},
           "bytes_per_chunk": {}, "chunk_rate_by_script": {}, "word_alignment": {}, "boundary_example": example}
    for name, s in stage.items():
        out["bytes_per_chunk"][name] = float(s["real_G"].sum() / max(s["starts_G"].sum(), 1.0))
        out["chunk_rate_by_script"][name] = {n: float(a / c) for n, a, c in zip(names, s["starts_G"], s["real_G"])
                                             if c > 0}
        out["word_alignment"][name] = dict(
            M.boundary_alignment(np.concatenate(s["pred"]), np.concatenate(s["gold"])),
            skip_ws=M.boundary_alignment(np.concatenate(s["pred_ws"]), np.concatenate(s["gold_ws"])))
    return out


def head_bytes(docs: list[bytes], budget: int) -> list[bytes]:
    """The first ``budget`` bytes of a document list (whole documents, the last one cut)."""
    out, left = [], budget
    for d in docs:
        if left <= 0:
            break
        out.append(d[:left])
        left -= len(out[-1])
    return out


def robustness(setup, cfg: data_lib.DataConfig, docs: list[bytes], n_bytes: int, seed: int, detail_fn=None) -> dict:
    """BPB of the clean head of ``docs`` and of each perturbation of it (same seed for every checkpoint)."""
    head = head_bytes(docs, n_bytes)
    clean = evaluate_corpus(setup, cfg, head, detail_fn)["bpb"]
    out = {"n_bytes_clean": sum(map(len, head)), "clean_bpb": clean, "perturbed": {}}
    for kind in M.PERTURBATIONS:
        bpb = evaluate_corpus(setup, cfg, [M.perturb(d, kind, seed) for d in head], detail_fn)["bpb"]
        out["perturbed"][kind] = {"bpb": bpb, "bpb_increase": bpb - clean}
    out["mean_bpb_increase"] = float(np.mean([v["bpb_increase"] for v in out["perturbed"].values()]))
    return out


def evaluate_checkpoint(setup, corpora: dict, *, robustness_bytes: int = 0, seed: int = 0, ntrex_dir: str | None = None,
                        ntrex_lines: int = 0) -> dict:
    """corpora: {name: (DataConfig, docs)} -> {'corpora': {name: metrics}, 'robustness': ..., 'multilingual': ...}."""
    detail_fn = make_detail_fn(setup.graphdef)
    res = {"corpora": {name: evaluate_corpus(setup, cfg, docs, detail_fn) for name, (cfg, docs) in corpora.items()}}
    if robustness_bytes:
        first = next(iter(corpora))
        res["robustness"] = {"corpus": first, **robustness(setup, *corpora[first], robustness_bytes, seed, detail_fn)}
    if ntrex_dir:
        res["multilingual"] = evaluate_languages(setup, next(iter(corpora.values()))[0], ntrex_dir,
                                                 max_lines=ntrex_lines)
    return res


# ------------------------------------------------------------------------------------------------
# Per language: BPB and segmentation parity on parallel text
# ------------------------------------------------------------------------------------------------


def make_sums_fn(graphdef, chunk_stage: str | None):
    """jit: (params, rest, batch) -> BPB sums, non-pad positions and chunks (``ByteLM.chunk_stage`` starts)."""

    @jax.jit
    def sums_fn(params, rest, batch):
        out = eval_forward(graphdef, params, rest, batch)
        sums = cross_entropy_sums(out, batch)
        real = batch["segment_ids"] > 0
        b = out.boundaries.get(chunk_stage, real)
        sums["n_positions"] = jnp.sum(real).astype(jnp.float32)
        sums["n_chunks"] = jnp.sum(b & real).astype(jnp.float32)
        return sums

    return sums_fn


def language_files(data_dir: str) -> dict[str, str]:
    """{lang: path} of the ``<lang>.txt`` files of ``data_dir`` (``shared:<path>`` allowed)."""
    if data_dir.startswith("shared:"):
        data_dir = shared_path(data_dir[len("shared:"):])
    files = sorted(glob.glob(os.path.join(data_dir, "*.txt")))
    if not files:
        raise DataError(f"no *.txt language files in {data_dir}")
    return {os.path.splitext(os.path.basename(f))[0]: f for f in files}


def _language_metrics(t: dict, ref_bytes) -> dict:
    """Ratios of one language's (or script's) sums; ``ref_bytes``: its English-equivalent bytes (or None)."""
    m = {"bpb": M.bpb(t["byte_nll_sum"], t["n_bytes"]),
         "bytes_per_chunk": t["n_positions"] / max(t["n_chunks"], 1.0),
         "boundary_rate": t["n_chunks"] / max(t["n_positions"], 1.0),
         "n_bytes": t["n_bytes"], "n_positions": t["n_positions"], "n_chunks": t["n_chunks"],
         "file_bytes": t["file_bytes"]}
    if ref_bytes:
        m["chunks_per_eng_byte"] = t["n_chunks"] / ref_bytes
    return m


def evaluate_languages(setup, eval_cfg: data_lib.DataConfig, data_dir: str = "shared:ntrex128/valid",
                       english: str = "eng", max_lines: int = 0, groups: str = "ntrex") -> dict:
    """Per-language metrics of the module docstring. ``eval_cfg`` gives seq_len and batch_size (the model's
    annotations are added); every file is one document, in order; ``max_lines`` > 0 keeps the first lines of
    every file (parallel content, so parity stays comparable). Scripts aggregate the languages by their
    dominant route under ``hnet.scripts.GROUPINGS[groups]``. Returns {'languages': {lang: {...}},
    'scripts': {...}, 'parity_max_over_min', 'parity_max_over_min_magnet9' (MAGNET's nine languages, when
    all are present), 'bpb_mean_over_languages'}."""
    sums_fn = make_sums_fn(setup.graphdef, setup.model.chunk_stage)
    names = route_names(GROUPINGS[groups])
    langs: dict[str, dict] = {}
    for lang, path in language_files(data_dir).items():
        cfg = dataclasses.replace(setup.data_config(eval_cfg), sources=(path,), byte_range=(0.0, 1.0),
                                  doc_split="file", shuffle=False, max_windows=0)
        with open(path, "rb") as f:
            text = f.read()
        if max_lines:
            text = b"\n".join(text.split(b"\n")[:max_lines])
        tot: dict[str, float] = {}
        for _, sums in eval_batches(setup, cfg, [Document(text, path)], sums_fn):
            add_sums(tot, sums)
        langs[lang] = {"script": names[dominant_route(text, GROUPINGS[groups])], "file_bytes": len(text), **tot}
    eng_bytes = langs[english]["file_bytes"] if english in langs else None
    out = {"languages": {}, "scripts": {}}
    for lang, t in langs.items():
        out["languages"][lang] = {"script": t["script"], **_language_metrics(t, eng_bytes)}
    for script in sorted({t["script"] for t in langs.values()}):
        members = [t for t in langs.values() if t["script"] == script]
        agg = {k: sum(t[k] for t in members) for k in ("byte_nll_sum", "n_bytes", "n_positions", "n_chunks",
                                                       "file_bytes")}
        out["scripts"][script] = {"languages": sorted(k for k, t in langs.items() if t["script"] == script),
                                  **_language_metrics(agg, eng_bytes and eng_bytes * len(members))}
    if eng_bytes:
        chunks = {lang: m["n_chunks"] for lang, m in out["languages"].items()}
        out["parity_max_over_min"] = M.parity(chunks, eng_bytes)["max_over_min"]
        if all(lang in chunks for lang in MAGNET_LANGUAGES):
            out["parity_max_over_min_magnet9"] = M.parity({k: chunks[k] for k in MAGNET_LANGUAGES},
                                                          eng_bytes)["max_over_min"]
    out["bpb_mean_over_languages"] = float(np.mean([m["bpb"] for m in out["languages"].values()]))
    return out
