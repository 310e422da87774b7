"""Evaluation suite (train/metrics.py, train/eval.py, train/evaluate.py) and the sweep runner (train/sweep.py):
each metric on a hand-checked example, the suite against the trainer's exact BPB, two tiny sweep runs and
skip-finished."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.sharding import make_mesh
from models.base import ByteLM, ModelOutput
from tests.helpers import pydoc_docs, tiny_model_fn
from train import data as data_lib
from train import eval as ev
from train import metrics as M
from train import sweep
from train.evaluate import parse_corpus
from train.loop import build_state
from train.optim import OptimizerConfig

# --------------------------------------------------------------------------------- perturbations


def test_perturbations_by_hand():
    assert M.perturb(b"the cat", "uppercase") == b"THE CAT"
    assert M.perturb(b"ab c\xc3\xa9", "antspeak") == "A B   C \u00c9".encode()
    assert M.perturb("ŝé".encode(), "uppercase") == "ŜÉ".encode()
    rc = M.perturb(b"abcdefghij" * 5, "randomcase", seed=3).decode()
    assert rc.lower() == "abcdefghij" * 5 and rc != rc.lower() and rc != rc.upper()


@pytest.mark.parametrize("kind", M.PERTURBATIONS)
def test_perturbations_deterministic_under_seed(kind):
    text = "Ünïcode text, with some words. " * 20
    a, b = M.perturb(text.encode(), kind, seed=1), M.perturb(text.encode(), kind, seed=1)
    assert a == b
    if kind in ("drop", "repeat", "randomcase"):
        assert M.perturb(text.encode(), kind, seed=2) != a


def test_drop_and_repeat_only_delete_or_duplicate_characters():
    text = "abcdefghijklmnopqrstuvwxyz" * 8
    dropped = M.perturb(text.encode(), "drop", seed=0).decode()
    it = iter(text)
    assert all(c in it for c in dropped)  # a subsequence
    assert 0.8 * len(text) < len(dropped) < len(text)
    rep = M.perturb(text.encode(), "repeat", seed=0).decode()
    collapsed = "".join(c for i, c in enumerate(rep) if i == 0 or rep[i - 1] != c)
    assert collapsed == text and len(rep) > len(text)


def test_invalid_utf8_survives_every_perturbation():
    data = b"ab\xff\xfe cd"
    for kind in ("uppercase", "randomcase", "drop", "repeat"):
        out = M.perturb(data, kind, seed=0)
        assert b"\xff\xfe" in out or kind == "drop" and b"\xff" in out and b"\xfe" in out


def test_unknown_perturbation_is_an_error():
    with pytest.raises(ValueError, match="antspeak"):
        M.perturb(b"x", "shout")


# ------------------------------------------------------------------------------- simple metrics


def test_skip_leading_whitespace_makes_word_conventions_agree():
    tok = np.frombuffer(b"ab  cd\nef", np.uint8).astype(np.int32)[None]
    seg = np.array([[1, 1, 1, 1, 1, 1, 1, 2, 2]])
    hat = np.zeros_like(tok, bool)
    hat[0, [0, 2, 6, 7]] = True  # "ab", "  cd", "\n" (its own segment's end), "ef"
    dtp = np.zeros_like(tok, bool)
    dtp[0, [0, 4, 7]] = True  # "ab  ", "cd\n", "ef"
    assert M.boundary_alignment(dtp, hat)["f1"] == pytest.approx(2 * (2 / 3 * 2 / 4) / (2 / 3 + 2 / 4))
    h, d = M.skip_leading_whitespace(hat, tok, seg), M.skip_leading_whitespace(dtp, tok, seg)
    assert np.flatnonzero(h[0]).tolist() == [0, 4, 7]  # "\n" ends segment 1: no non-space left there
    assert M.boundary_alignment(d, h)["f1"] == 1.0
    assert M.skip_leading_whitespace(hat[0], tok[0], seg[0]).shape == (9,)


def test_boundary_alignment_by_hand():
    pred = np.array([1, 0, 1, 1, 0, 0], bool)
    gold = np.array([1, 0, 0, 1, 1, 0], bool)
    a = M.boundary_alignment(pred, gold)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    m = np.array([0, 1, 1, 1, 1, 1], bool)  # masking position 0 drops one true positive
    a = M.boundary_alignment(pred, gold, m)
    assert (a["precision"], a["recall"]) == (0.5, 0.5)


def test_parity_on_a_toy_parallel_pair():
    p = M.parity({"eng": 10.0, "deu": 15.0}, english_bytes=20.0)
    assert p["chunks_per_eng_byte"] == {"eng": 0.5, "deu": 0.75}
    assert p["max_over_min"] == pytest.approx(1.5)


def test_group_sums_and_per_group_bpb():
    nll = np.array([[1.0, 2.0, 3.0, 4.0]])
    groups = np.array([[0, 1, 1, 0]])
    w = np.array([[1, 1, 0, 1]], bool)
    np.testing.assert_allclose(M.group_sums(nll, groups, w, 3), [5.0, 2.0, 0.0])
    np.testing.assert_allclose(M.group_sums(1.0, groups, w, 3), [2.0, 1.0, 0.0])
    assert M.per_group_bpb(np.array([5.0, 2.0, 0.0]), np.array([2.0, 1.0, 0.0]), ["a", "b", "c"]) == {
        "a": pytest.approx(2.5 / math.log(2)), "b": pytest.approx(2 / math.log(2))}


def test_parse_corpus():
    assert parse_corpus("w=shared:english/world192.txt@0.9-1.0") == ("w", "shared:english/world192.txt", (0.9, 1.0))
    assert parse_corpus("x=/a/b.txt") == ("x", "/a/b.txt", (0.0, 1.0))
    with pytest.raises(ValueError):
        parse_corpus("/a/b.txt")


# -------------------------------------------------------------------- the suite on a fixed model


class AsciiLM(ByteLM):
    """Logits 5 on ASCII bytes, 0 elsewhere, at every position; chunk starts at spaces."""

    def __init__(self, seed: int = 0):
        self.w = nnx.Param(jnp.zeros(()))

    def __call__(self, batch):
        B, L = batch["inputs"].shape
        logits = jnp.where(jnp.arange(256) < 128, 5.0, 0.0) + self.w[...]
        return ModelOutput(jnp.broadcast_to(logits, (B, L, 256)), boundaries={"s0": batch["inputs"] == ord(" ")})


def test_suite_by_script_and_alignment_by_hand():
    """'abc где xyz': targets latin a b c ␠ x y z (7 ASCII), Cyrillic г д е (6 bytes) + the ␠ after them."""
    setup = build_state(AsciiLM, OptimizerConfig(), 10, make_mesh())
    cfg = data_lib.DataConfig(seq_len=16, batch_size=2, shuffle=False)
    res = ev.evaluate_corpus(setup, cfg, ["abc где xyz".encode()])
    lse = math.log(128 * math.exp(5) + 128)
    assert res["bytes_by_script"] == {"latin": 7.0, "cyrl": 7.0}
    assert res["bpb_by_script"]["latin"] == pytest.approx((lse - 5) / math.log(2), rel=1e-5)
    assert res["bpb_by_script"]["cyrl"] == pytest.approx((7 * lse - 5) / (7 * math.log(2)), rel=1e-5)
    assert res["bpb"] == pytest.approx((14 * lse - 8 * 5) / (14 * math.log(2)), rel=1e-5)
    # 14 real input bytes (BOS/EOS excluded), 2 spaces -> 7 bytes per chunk
    assert res["bytes_per_chunk"]["s0"] == pytest.approx(7.0)
    # HAT words: 'abc', ' где', ' xyz' -> gold starts a, ␠, ␠; predicted starts ␠, ␠
    wa = res["word_alignment"]["s0"]
    assert (wa["precision"], wa["recall"]) == (1.0, pytest.approx(2 / 3))
    # moved off the spaces (pred г, x; gold a, г, x): the same counts
    assert (wa["skip_ws"]["precision"], wa["skip_ws"]["recall"]) == (1.0, pytest.approx(2 / 3))
    assert res["chunk_rate_by_script"]["s0"] == {"latin": pytest.approx(1 / 7), "cyrl": pytest.approx(1 / 7)}
    assert res["boundary_example"] == {"s0": "abc| где| xyz"}
    assert res["n_masked_by_model"] == 0


def test_boundary_pictures_print_whole_characters():
    """A chunk start inside a multi-byte character (Cyrillic, Devanagari, Tibetan: 2 and 3 bytes) is marked '¦'
    before the whole character, never cut into U+FFFD; starts at first bytes are '|'; invalid bytes are U+FFFD."""
    text = "".join(map(chr, (0x0433, 0x0434, 0x20, 0x0915, 0x093F, 0x20, 0x0F40, 0x0F72)))  # гд कि ཀི
    data = text.encode() + b"\xff!"
    starts = np.zeros(len(data), bool)
    starts[[1, 2, 4, 6, 14, 18, 19]] = True  # inside г, first byte of д, ␠, inside क, inside ཀ, 0xff, !
    assert ev.mark_boundaries(np.frombuffer(data, np.uint8), starts) == (
        "¦г|д| " + "¦" + chr(0x0915) + chr(0x093F) + " " + "¦" + chr(0x0F40) + chr(0x0F72) + "|\ufffd|!")


def test_suite_bpb_equals_trainer_eval_and_robustness_is_consistent():
    setup = build_state(tiny_model_fn(d_model=32), OptimizerConfig(), 10, make_mesh())
    cfg = data_lib.DataConfig(seq_len=64, batch_size=4, shuffle=False)
    docs = pydoc_docs(("pass", "continue"))
    res = ev.evaluate_corpus(setup, cfg, docs)
    ref = ev.evaluate(setup, cfg, docs)
    assert res["bpb"] == pytest.approx(ref["bpb"], rel=1e-6) and res["n_bytes"] == ref["n_bytes"]
    rob = ev.robustness(setup, cfg, docs, 300, seed=0)
    assert rob["n_bytes_clean"] == 300
    assert rob["clean_bpb"] == pytest.approx(ev.evaluate(setup, cfg, ev.head_bytes(docs, 300))["bpb"], rel=1e-6)
    assert set(rob["perturbed"]) == set(M.PERTURBATIONS)
    up = rob["perturbed"]["uppercase"]
    assert up["bpb_increase"] == pytest.approx(up["bpb"] - rob["clean_bpb"])


# ------------------------------------------------------------------------------------ sweep runner


SWEEP = """
sweep.Sweep.name = 'tiny'
sweep.Sweep.models = ['configs/isotropic_tiny.gin']
sweep.Sweep.run_files = ['configs/runs/default.gin']
sweep.Sweep.variants = {{'': ['TRAIN_STEPS=2', 'SEQ_LEN=32', 'BATCH=2', 'train.train.sample_prompts=()',
                              'train.train.log_every=1', 'eval/train.DataConfig.max_windows=4']}}
sweep.Sweep.model_bindings = {{'configs/isotropic_tiny.gin': ['hnet.StackConfig.d_ff=128']}}
sweep.Sweep.seeds = [0, 1]
sweep.Sweep.eval_args = ['--robustness_bytes=64', '--corpus=pass={corpus}']
"""


@pytest.fixture
def tiny_sweep(tmp_path, gin_clean):
    corpus = tmp_path / "pass.txt"
    corpus.write_bytes(pydoc_docs(("pass",))[0][:200])
    path = tmp_path / "sweep.gin"
    path.write_text(SWEEP.format(corpus=corpus))
    return str(path), str(tmp_path / "root")


def test_sweep_runs_two_tiny_runs_then_skips_them(tiny_sweep, monkeypatch, gin_clean):
    path, root = tiny_sweep
    rows = sweep.run_sweep(path, root)
    assert [r["run"] for r in rows] == ["isotropic_tiny-s0", "isotropic_tiny-s1"]
    for r in rows:
        assert r["steps"] == 2 and r["corpus"] == "pass" and 0 < r["bpb"] < 12
        assert r["flops_per_byte"] > 0 and set(r["robustness"]) == set(M.PERTURBATIONS)
    assert rows[0]["bpb"] != rows[1]["bpb"]  # the seed reaches the model
    assert all(r["n_masked_by_model"] == 0 for r in rows)
    table = sweep.markdown(rows)
    assert "| masked bytes |" in table and " | 0 | " in table
    out = os.path.join(root, "tiny")
    table = open(os.path.join(out, "sweep.md")).read()
    assert "isotropic_tiny-s1" in table and json.load(open(os.path.join(out, "sweep.json"))) == rows
    assert os.path.exists(os.path.join(out, "bpb_vs_flops.png"))
    assert os.path.exists(os.path.join(out, "isotropic_tiny-s0", "eval", "eval.md"))

    def no_subprocess(*a, **k):
        raise AssertionError(f"finished run re-executed: {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    import gin

    gin.clear_config()
    again = sweep.run_sweep(path, root)
    assert [r["bpb"] for r in again] == [r["bpb"] for r in rows]


def test_sweep_launcher_prints_commands_and_runs_nothing(tiny_sweep, monkeypatch, capsys):
    path, root = tiny_sweep
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a subprocess"))
    rows = sweep.run_sweep(path, root, launcher="python -m launch.slurm --nodes 2")
    out = capsys.readouterr().out
    assert rows == []
    lines = [ln for ln in out.splitlines() if ln.startswith("python -m launch.slurm --nodes 2 -- ")]
    assert len(lines) == 2 and "--gin.train.train.seed=1" in lines[1]
    assert f"--workdir={os.path.abspath(root)}/tiny/isotropic_tiny-s1" in lines[1]
    assert "--gin_file=configs/isotropic_tiny.gin" in lines[0]
    only = sweep.run_sweep(path, root, dry_run=True, only=["isotropic_tiny-s1"])
    assert only == [] and capsys.readouterr().out.count("python -m train.main") == 1
    with pytest.raises(SystemExit, match="matches no run"):
        sweep.run_sweep(path, root, dry_run=True, only=["hat"])
    args = lines[0].split()
    assert args.index("--gin.hnet.StackConfig.d_ff=128") < args.index("--gin.TRAIN_STEPS=2")  # model's, then variant's


def test_sweep_rejects_bindings_for_unlisted_models():
    sw = sweep.Sweep(name="x", models=("a.gin",), model_bindings={"b.gin": ("K=1",)})
    with pytest.raises(ValueError, match="b.gin"):
        sweep.expand(sw, "/tmp/unused")


def test_sweep_models_may_be_globs():
    """'configs/*_tiny.gin' stands for every tiny config, sorted and repo-relative, after the files listed before
    it (each file once): a sweep finds the families."""
    tiny = sorted(os.path.relpath(p, sweep.REPO_ROOT) for p in glob.glob(os.path.join(sweep.REPO_ROOT, "configs",
                                                                                       "*_tiny.gin")))
    assert len(tiny) > 5
    sw = sweep.Sweep(name="x", models=(tiny[-1], "configs/*_tiny.gin"), model_bindings={tiny[1]: ("K=1",)})
    runs = sweep.expand(sw, "/tmp/unused")
    stem = lambda f: os.path.splitext(os.path.basename(f))[0]  # noqa: E731
    assert [r.model for r in runs] == [stem(tiny[-1])] + [stem(t) for t in tiny[:-1]]
    assert "--gin.K=1" in runs[2].train_args and f"--gin_file={tiny[1]}" in runs[2].train_args
    with pytest.raises(ValueError, match="nothing_"):
        sweep.expand(sweep.Sweep(name="x", models=("configs/nothing_*.gin",)), "/tmp/unused")
