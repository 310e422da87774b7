"""Per-language / per-script evaluation on parallel text (NTREX-128 valid): BPB, bytes per chunk and
chunks per English-equivalent byte (MAGNET-style segmentation parity).

For every language file ``<data_dir>/<lang>.txt`` (one document per file, windows of the eval
DataConfig's seq_len, the model in eval mode):
  bpb                   Σ NLL over real UTF-8 target bytes / (ln 2 · #bytes)
  bytes_per_chunk       #non-pad input positions / #chunks (boundary_rate: its inverse)
  chunks_per_eng_byte   #chunks / #UTF-8 bytes of the English side (eng.txt): the same content in every
                        language, so equal values mean equal segmentation cost (parity)
Chunks are the START bits of the model's ``chunk_stage`` (``out.boundaries['s0']``; MrT5: its kept
positions, ``out.boundaries['kept']``), over non-pad positions (document/window starts included); a model without
boundaries counts one chunk per byte. Scripts aggregate the languages by
their dominant route under ``hnet.scripts.GROUPINGS[groups]`` (default 'ntrex': one group per script;
sums, then ratios). ``parity_max_over_min`` is the max/min over languages of chunks_per_eng_byte, and
``parity_max_over_min_magnet9`` the same over MAGNET's nine languages (``MAGNET_LANGUAGES``).

    python -m train.multilingual_eval --workdir DIR --gin_file configs/magnet_tiny.gin \
        --gin_file configs/runs/ntrex_multilingual.gin [--data_dir shared:ntrex128/valid] [--groups ntrex] [--out FILE]
loads the latest checkpoint of DIR and writes DIR/multilingual_eval.json (and TensorBoard scalars).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hnet import sharding
from hnet.scripts import GROUPINGS, route_names
from train import data as data_lib
from train import storage
from train.metrics import parity
from train.step import LN2, cross_entropy_sums, eval_forward

MAGNET_LANGUAGES = ("eng", "spa", "fra", "rus", "ukr", "bel", "hin", "ben", "tel")  # Ahia et al. 2024


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
    if data_dir.startswith("shared:"):
        data_dir = data_lib.shared_path(data_dir[len("shared:"):])
    files = sorted(glob.glob(os.path.join(data_dir, "*.txt")))
    if not files:
        raise data_lib.DataError(f"no *.txt language files in {data_dir}")
    return {os.path.splitext(os.path.basename(f))[0]: f for f in files}


def evaluate_languages(setup, eval_cfg: data_lib.DataConfig, data_dir: str = "shared:ntrex128/valid",
                       english: str = "eng", max_lines: int = 0, groups: str = "ntrex") -> dict:
    """setup: train.loop.Setup (graphdef + state + mesh). eval_cfg gives seq_len, batch_size and the
    annotations the model needs; ``max_lines`` > 0 keeps the first lines of every file (parallel content,
    so parity stays comparable). Returns {'languages': {lang: {...}}, 'scripts': {...}, 'parity_...'}."""
    from train.annotations import dominant_route

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
        docs = [data_lib.Document(text, path)]
        tot: dict[str, float] = {}
        with sharding.mesh_context(setup.mesh):
            for local in data_lib.iterate_eval_batches(cfg, docs):
                batch = sharding.global_batch_from_local(setup.mesh, local)
                for k, v in jax.device_get(sums_fn(setup.state.params, setup.state.rest, batch)).items():
                    tot[k] = tot.get(k, 0.0) + float(v)
        langs[lang] = {"script": names[dominant_route(text, GROUPINGS[groups])], "file_bytes": len(text), **tot}
    eng_bytes = langs[english]["file_bytes"] if english in langs else None
    out = {"languages": {}, "scripts": {}}

    def metrics(t: dict, ref_bytes) -> dict:
        m = {"bpb": t["byte_nll_sum"] / (LN2 * max(t["n_bytes"], 1.0)),
             "bytes_per_chunk": t["n_positions"] / max(t["n_chunks"], 1.0),
             "boundary_rate": t["n_chunks"] / max(t["n_positions"], 1.0),
             "n_bytes": t["n_bytes"], "n_positions": t["n_positions"], "n_chunks": t["n_chunks"],
             "file_bytes": t["file_bytes"]}
        if ref_bytes:
            m["chunks_per_eng_byte"] = t["n_chunks"] / ref_bytes
        return m

    for lang, t in langs.items():
        out["languages"][lang] = {"script": t["script"], **metrics(t, eng_bytes)}
    for script in sorted({t["script"] for t in langs.values()}):
        members = [t for t in langs.values() if t["script"] == script]
        agg = {k: sum(t[k] for t in members) for k in ("byte_nll_sum", "n_bytes", "n_positions", "n_chunks",
                                                       "file_bytes")}
        out["scripts"][script] = {"languages": sorted(k for k, t in langs.items() if t["script"] == script),
                                  **metrics(agg, eng_bytes and eng_bytes * len(members))}
    if eng_bytes:
        chunks = {lang: m["n_chunks"] for lang, m in out["languages"].items()}
        out["parity_max_over_min"] = parity(chunks, eng_bytes)["max_over_min"]
        if all(lang in chunks for lang in MAGNET_LANGUAGES):
            out["parity_max_over_min_magnet9"] = parity({k: chunks[k] for k in MAGNET_LANGUAGES},
                                                        eng_bytes)["max_over_min"]
    bpbs = [m["bpb"] for m in out["languages"].values()]
    out["bpb_mean_over_languages"] = float(np.mean(bpbs))
    return out


def main(argv=None) -> dict:
    import argparse

    import gin

    from train import config
    from train.checkpoint import Checkpointer
    from train.loop import build_state

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--data_dir", default="shared:ntrex128/valid")
    parser.add_argument("--max_lines", type=int, default=0, help="first lines of every file (0 = all)")
    parser.add_argument("--groups", default="ntrex", choices=sorted(GROUPINGS), help="script labels of languages")
    parser.add_argument("--out", default=None)
    bindings, rest = config.split_gin_args(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    config.parse(args.gin_file, bindings)
    model_fn = gin.query_parameter("train.train.model").scoped_configurable_fn
    eval_cfg = gin.query_parameter("train.train.eval_data").scoped_configurable_fn()
    opt_cfg = gin.query_parameter("train.train.optimizer").scoped_configurable_fn()
    steps = gin.query_parameter("train.train.steps")
    steps = steps.scoped_configurable_fn() if isinstance(steps, gin.config.ConfigurableReference) else steps  # macro
    mesh = sharding.make_mesh({"data": -1})
    setup = build_state(model_fn, opt_cfg, steps, mesh, allocate=False)
    ckpt = Checkpointer(storage.join(args.workdir, "checkpoints"), every_steps=0, async_save=False)
    step, state = ckpt.restore_latest(setup.state)
    if state is None:
        raise SystemExit(f"no checkpoint in {args.workdir}/checkpoints")
    setup.state = state
    res = {"workdir": args.workdir, "step": int(step),
           **evaluate_languages(setup, eval_cfg, args.data_dir, max_lines=args.max_lines, groups=args.groups)}
    path = args.out or storage.join(args.workdir, "multilingual_eval.json")
    storage.write_text(path, json.dumps(res, indent=1))
    try:
        from train.logger import MetricWriter

        w = MetricWriter(storage.join(args.workdir, "tb"))
        for lang, m in res["languages"].items():
            w.scalars(int(step), {k: v for k, v in m.items() if isinstance(v, float)}, f"multilingual/{lang}/")
        for script, m in res["scripts"].items():
            w.scalars(int(step), {k: v for k, v in m.items() if isinstance(v, float)}, f"multilingual/script_{script}/")
        w.scalars(int(step), {k: res[k] for k in ("parity_max_over_min", "parity_max_over_min_magnet9",
                                                  "bpb_mean_over_languages") if k in res}, "multilingual/")
        w.close()
    except ImportError:
        pass
    print(json.dumps({k: v for k, v in res.items() if k != "languages"}, indent=1))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
