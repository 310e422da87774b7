"""Every shipped tiny config as a new user runs it (README: train.main with configs/runs/default.gin: train,
final eval, samples, results.json); train.generate equals the full forward for every causal config; every
``python -m`` entry point answers --help with status 0."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnet.sharding import mesh_context
from tests.helpers import REPO_ROOT, pydoc_text

TINY = sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*_tiny.gin")))
NON_DECODING = {"configs/mrt5_encdec_tiny.gin"}  # span-corruption encoder-decoder: supports_decoding = False
LANG_ROUTED = {"configs/magnet_lang_tiny.gin"}  # needs <lang>.txt sources and a language per sample prompt
# the README job made as cheap as it gets: 2 steps of 2 x 32 bytes, eval on 2 windows, 8 sampled bytes; the
# prompts: Cyrillic letters (the script routes of MAGNET change) and the run file's 'The '
PROMPTS = ("".join(map(chr, range(0x0410, 0x0414))) + " ", "The ")
LANGS = ("eng", "deu")  # the prompts' languages for a language-routed model (its <lang>.txt corpus below)
CHEAP = ["TRAIN_STEPS = 2", "SEQ_LEN = 32", "BATCH = 2", "eval/train.DataConfig.max_windows = 2",
         "train.train.sample_bytes = 8", "train.train.log_every = 1", "train.train.checkpoint_every = 2",
         f"train.train.sample_prompts = {PROMPTS!r}"]


def _one_layer_per_block(model_file: str) -> list[str]:
    """Bindings that cut every layout the config binds to one layer per block ('T4' -> 'T1', 'm2' -> 'm1',
    nested H-Net layouts alike): compiling is what these tests pay for, and it grows with the layers."""
    import re

    from train.config import parse

    parse([os.path.join(REPO_ROOT, model_file), os.path.join(REPO_ROOT, "configs/runs/default.gin")], [])
    one = lambda v: re.sub(r"([A-Za-z])\d+", r"\g<1>1", v) if isinstance(v, str) else [one(x) for x in v]  # noqa: E731
    out = []
    for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001 - gin has no public iterator
        for name, v in params.items():
            if name.endswith("layout") and one(v) != v:
                out.append(f"{scope + '/' if scope else ''}{selector}.{name} = {one(v)!r}")
    gin.clear_config()
    return out


def _lang_corpus(root) -> list[str]:
    """Bindings that point a language-routed run at <lang>.txt files (real text) and give its prompts languages."""
    d = root / "lang_corpus"
    d.mkdir(exist_ok=True)
    for lang, key in zip(LANGS, ("assignment", "lambda")):
        (d / f"{lang}.txt").write_text(pydoc_text(key))
    return [f"train/train.DataConfig.sources = ('{d}',)", f"eval/train.DataConfig.sources = ('{d}',)",
            f"train.train.sample_langs = {LANGS!r}"]


@pytest.mark.parametrize("model_file", TINY)
def test_every_tiny_config_through_the_cli_and_its_generation(model_file, tmp_path, gin_clean, monkeypatch):
    """train.main's path after its flags (``train_from_config``: config -> train -> final eval -> samples ->
    results.json; the persistent compilation cache off). For causal models, the logits the trainer's sampler
    drew from equal the eval-mode forward on the same bytes annotated by the data pipeline (word starts, per-byte
    script routes, language routes): generation follows the forward's boundaries and routes."""
    import train.loop
    from train import data as data_lib
    from train.annotations import ANNOTATIONS
    from train.generate import continuation_text, generate_arrays
    from train.main import train_from_config
    from train.step import eval_forward

    seen = {}

    def recording_generate(model, prompts, **kw):  # train.generate.generate, keeping what it fed and saw
        outs, seen["fed"], seen["logits"] = generate_arrays(model, prompts, **kw)
        seen["langs"] = kw.get("langs")
        return [continuation_text(o) for o in outs]

    monkeypatch.setattr(train.loop, "generate", recording_generate)
    lang_routed = model_file in LANG_ROUTED
    bindings = CHEAP + _one_layer_per_block(model_file) + (_lang_corpus(tmp_path) if lang_routed else [])
    wd = tmp_path / "run"
    res = train_from_config([os.path.join(REPO_ROOT, model_file), os.path.join(REPO_ROOT, "configs/runs/default.gin")],
                            bindings, str(wd), compilation_cache_dir="")
    on_disk = json.loads((wd / "results.json").read_text())
    assert on_disk["final_step"] == 2 and [h["step"] for h in on_disk["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in on_disk["history"])
    ev = on_disk["eval"]
    assert ev["n_bytes"] > 0 and np.isfinite(ev["bpb"]) and "n_masked_by_model" in ev
    assert os.listdir(wd / "checkpoints") and (wd / "operative_config.gin").exists()
    if model_file in NON_DECODING:
        assert "samples" not in on_disk and not seen
        return
    assert ev["n_masked_by_model"] == 0  # eval never drops a byte (capacities cannot overflow)
    assert [s[:len(p)] for s, p in zip(on_disk["samples"], PROMPTS)] == list(PROMPTS)
    assert seen["langs"] == (list(LANGS) if lang_routed else None)

    fed = seen["fed"]
    B, T = fed.shape
    batch = {"inputs": fed, "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T), (B, 1))}
    setup = res["setup"]
    for name in setup.model.required_annotations():  # what the model declares, the data pipeline provided
        fn, dtype = ANNOTATIONS[name]  # each row is one document: BOS + its bytes (the EOS slot dropped)
        docs = [data_lib.Document(bytes(r[1:].astype(np.uint8).tolist()), f"{g}.txt") for r, g in zip(fed, LANGS)]
        batch[name] = np.stack([np.asarray(fn(d), dtype)[:T] for d in docs])
        if name.startswith(("script_routes", "lang_routes")):  # the rows take different routes
            assert len(np.unique(batch[name])) > 1, batch[name]
    with mesh_context(setup.mesh):
        out = jax.jit(lambda p, r, b: eval_forward(setup.graphdef, p, r, b))(
            setup.state.params, setup.state.rest, {k: jnp.asarray(v) for k, v in batch.items()})
    assert out.target_mask_BxL is None or np.asarray(out.target_mask_BxL).all()
    np.testing.assert_allclose(seen["logits"], np.asarray(out.logits_BxLxV), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- --help

ENTRY_POINTS = sorted(
    os.path.splitext(os.path.relpath(p, REPO_ROOT))[0].replace(os.sep, ".")
    for pkg in ("train", "launch", "benchmarks") for p in glob.glob(os.path.join(REPO_ROOT, pkg, "*.py"))
    if 'if __name__ == "__main__"' in open(p).read())


def test_help_exits_zero_for_every_entry_point():
    assert {"train.main", "train.evaluate", "train.sample", "train.sweep",
            "train.multilingual_eval"} <= set(ENTRY_POINTS)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in ENTRY_POINTS}
    for m, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (m, p.returncode, err[-2000:])
        assert "usage" in out.lower() or "flags:" in out, (m, out[:500])
