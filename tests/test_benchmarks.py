"""benchmarks/throughput.py, peers.py, attention_kernel.py, layer_parts.py and device_check.py: tables, JSON, discovered
families, the skip without PyTorch, the device check's CPU smoke run (interpret mode); the slow tests run each
script end to end on one tiny config."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
from jax import lax
import pytest

from tests.conftest import REPO_ROOT as REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import attention_kernel  # noqa: E402
import layer_parts  # noqa: E402
import peers  # noqa: E402
import profile_step  # noqa: E402
import throughput  # noqa: E402


def _row(config, L, bps):
    return {"config": config, "seq_len": L, "batch": 8192 // L, "params": 1e6, "flops_per_byte": 1e7,
            "compile_s": 5.0, "step_s": 8192 / bps, "bytes_per_s": bps, "peak_rss_mb": 900.0,
            "load_before": (2.0, 2.0, 2.0), "load_after": (3.0, 2.0, 2.0)}


def test_attention_kernel_benchmark_times_every_variant(tmp_path, capsys):
    # a padded tail (fill < 1): the dense path, the automatic tiles and a fixed size, no torch row
    out = tmp_path / "attn.json"
    attention_kernel.main(["--shapes", "2x128x2x8", "--fill", "0.5", "--rounds", "1", "--tiles", "auto", "32x32",
                           "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["tiles"]) for r in rows] == [("dense", "–"), ("blockwise auto", "64x64"),
                                                          ("blockwise 32x32", "32x32")]
    assert all(r["seconds"] > 0 for r in rows) and "| 2x128x2x8 | 0.5 | blockwise auto | 64x64 |" in capsys.readouterr().out


def test_layer_parts_times_and_counts_every_part(tmp_path, monkeypatch):
    """Every part runs (torch's side too when installed); the projection's count is its 6 FLOPs per weight per
    row (output and backward: no dead forward); the block's is at least the sum of its parts'."""
    out = tmp_path / "parts.json"
    B, L, D, H = 2, 64, 32, 2
    layer_parts.main(["--shape", f"{B}x{L}x{D}x{H}", "--d_ff", "64", "--rounds", "1", "--out", str(out)])
    rows = {r["part"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(layer_parts.PARTS) and all(r["ours_s"] > 0 for r in rows.values())
    assert rows["matmul"]["gflop"] * 1e9 == pytest.approx(6 * B * L * D * 3 * D, rel=1e-3)
    parts = ("rmsnorm", "qkv_rope", "attention", "swiglu")
    assert rows["block"]["gflop"] >= sum(rows[p]["gflop"] for p in parts) + rows["rmsnorm"]["gflop"]
    has_torch = importlib.util.find_spec("torch") is not None
    assert all(("torch_s" in r) == (has_torch and p != "mamba2") for p, r in rows.items())


def test_tables_and_json(tmp_path):
    rows = [_row("a", 1024, 2000.0), _row("a", 8192, 500.0), _row("b", 1024, 1000.0)]
    table = throughput.markdown_table(rows)
    assert table.count("\n") == 4 and "| a | 8192 | 1 | 1.00M | 0.0100 | 5.0 | 16384 | 500 | 900 | 2.0→3.0 |" in table
    scaling = throughput.scaling_table(rows).splitlines()
    assert scaling[0] == "| config | L=1024 | L=8192 | 8192/1024 |"
    assert scaling[2] == "| a | 2000 | 500 | 0.25 |" and scaling[3] == "| b | 1000 | — | — |"
    throughput.write_json(str(tmp_path / "t.json"), rows, steps=1)
    assert json.load(open(tmp_path / "t.json"))["rows"][2]["config"] == "b"

    s = peers.summarize("transformer", 1024, [(_row("x", 1024, 3000.0), _row("y", 1024, 1000.0)),
                                              (_row("x", 1024, 2000.0), _row("y", 1024, 1000.0))])
    assert s["ratios"] == [3.0, 2.0] and s["ratio"] == 2.5 and s["mismatch"] == peers.PAIRS["transformer"]["mismatch"]
    assert "**2.50×** (3.00, 2.00)" in peers.markdown_table([s])


def test_peers_skips_cleanly_without_torch(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert peers.main(["--seq_lens", "64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"skipped, (\w+, )*torch(, \w+)* not installed", out) and ".[bench]" in out


@pytest.mark.slow
def test_throughput_end_to_end(tmp_path):
    throughput.main(["--configs", "isotropic_tiny", "--seq_lens", "64", "--bytes_per_step", "128", "--steps", "1",
                     "--out", str(tmp_path / "t.json")])
    (row,) = json.load(open(tmp_path / "t.json"))["rows"]
    assert row["batch"] == 2 and row["bytes_per_s"] > 0 and len(row["load_before"]) == 3


def test_throughput_from_a_trained_state(tmp_path):
    """--init_from times the latest train state of a run: the restored step count continues from it."""
    from train import main as train_main

    wd = str(tmp_path / "run")
    train_main.train_from_config(
        [os.path.join(REPO, "configs", f) for f in ("isotropic_tiny.gin", "runs/default.gin")],
        ["TRAIN_STEPS=3", "SEQ_LEN=64", "BATCH=2", "train.train.eval_every=0", "train.train.sample_prompts=()",
         "eval/train.DataConfig.max_windows=2"], wd)
    throughput.main(["--configs", "isotropic_tiny", "--seq_lens", "64", "--bytes_per_step", "128", "--steps", "1",
                     "--init_from", wd, "--out", str(tmp_path / "t.json")])
    (row,) = json.load(open(tmp_path / "t.json"))["rows"]
    assert row["init_from"] == os.path.abspath(wd) and row["bytes_per_s"] > 0


def test_families_are_the_tiny_configs():
    # discovered, not listed: configs the old hand-kept list had missed are there
    assert {"hnet_1stage_tiny", "magnet_lso_tiny", "mrt5_encdec_tiny"} <= set(throughput.FAMILIES)
    assert all(os.path.exists(os.path.join(REPO, "configs", f"{c}.gin")) for c in throughput.FAMILIES)


@pytest.mark.slow
def test_throughput_skips_a_config_its_run_data_cannot_feed(tmp_path, capsys):
    throughput.main(["--configs", "magnet_lang_tiny", "--seq_lens", "64", "128", "--bytes_per_step", "128",
                     "--steps", "1", "--out", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert out.count("magnet_lang_tiny: skipped, language routing needs documents from files named") == 1, out
    assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_peers_end_to_end(tmp_path):
    if peers.missing_modules():
        pytest.skip(f"{peers.missing_modules()} not installed")
    pairs = ["transformer", "transformer_xt", "hnet_attn"]
    assert peers.main(["--pairs", *pairs, "--seq_lens", "64", "--bytes_per_step", "128", "--steps", "1",
                       "--rounds", "1", "--out", str(tmp_path / "p.json")]) == 0
    rows = json.load(open(tmp_path / "p.json"))["rows"]
    assert [s["pair"] for s in rows] == pairs and all(s["ratio"] > 0 and s["peer_params"] > 0 for s in rows)
    # the like-for-like peers have our architectures: parameter counts within 2 %
    for s in rows[1:]:
        assert abs(s["peer_params"] / s["ours_params"] - 1) < 0.02, s


def test_models_from_a_sweep_file_carry_their_own_bindings(gin_clean):
    models = throughput.sweep_models(os.path.join(REPO, "configs/sweeps/matched_models.gin"))
    assert "main/hnet.StackConfig.d_model=224" in models["hat_tiny"] and models["hnet_1stage_tiny"] == []
    assert all(os.path.exists(os.path.join(REPO, "configs", f"{m}.gin")) for m in models)


@pytest.mark.parametrize("train_step", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_device_check_smoke_on_cpu(tmp_path, train_step):
    """The GPU device check (run once when a device is lent) keeps working: --small on CPU runs the Triton
    kernel in interpret mode; every correctness check passes and every timing row has a time (the slow
    variant also times the bf16 H-Net train step with chunk_impl jnp and pallas, equal losses)."""
    out = tmp_path / "dc.json"
    args = [sys.executable, os.path.join(REPO, "benchmarks", "device_check.py"), "--small", "--iters", "1",
            "--tiles", "8", "--out", str(out)] + ([] if train_step else ["--skip-train"])
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(out))
    assert len(res["correctness"]) >= 5 and all(r["ok"] for r in res["correctness"]), res["correctness"]
    assert sum(r["check"].startswith("attention blockwise") for r in res["correctness"]) == 3
    assert res["info"]["attention_auto_L4096"] == {"bfloat16": "blockwise", "float32": "blockwise"}
    assert res["timings"] and all(r.get("ms_median", 0) > 0 and not r.get("error") for r in res["timings"])
    if train_step:
        steps = {r["impl"]: r for r in res["train_step"]}
        assert steps["jnp"]["status"] == steps["pallas"]["status"] == "ok"
        assert steps["jnp"]["loss"] == pytest.approx(steps["pallas"]["loss"], rel=1e-3)


def _matmul_then_tanh(a, b):
    return jnp.tanh(a @ b)


def test_profile_attributes_ops_to_our_functions(tmp_path):
    # each executed HLO op of a traced jit call is found in the optimized HLO and labelled with our function
    import jax

    a = jnp.ones((64, 64))
    compiled = jax.jit(_matmul_then_tanh).lower(a, a).compile()
    instrs, comps, labels = profile_step.parse_hlo(compiled.as_text())
    compiled(a, a).block_until_ready()
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    compiled(a, a).block_until_ready()
    jax.profiler.stop_trace()
    times = profile_step.op_times(str(tmp_path))
    assert times and all(op in instrs for op in times)
    kinds = {profile_step.kind(instrs[op][0], comps.get(instrs[op][2], set())) for op in times}
    assert "matmul" in kinds
    assert {labels[instrs[op][1]] for op in times} == {"tests/test_benchmarks.py:_matmul_then_tanh"}


def _project_with_our_linear(x):
    from flax import nnx

    from hnet.layers import Linear

    return jnp.tanh(Linear(64, 32, rngs=nnx.Rngs(0))(x))


def test_profile_gives_our_linear_wrappers_ops_to_their_caller():
    # hnet.layers.Linear is a wrapper (profile_step.WRAPPERS): its matmul is the caller's, tagged [Linear.__call__]
    import jax

    x = jnp.ones((2, 8, 64))
    compiled = jax.jit(_project_with_our_linear).lower(x).compile()
    instrs, comps, labels = profile_step.parse_hlo(compiled.as_text())
    matmuls = {labels[f] for op, f, calls in instrs.values() if f is not None
               and profile_step.kind(op, comps.get(calls, set())) == "matmul"}
    assert matmuls == {"tests/test_benchmarks.py:_project_with_our_linear [Linear.__call__]"}, matmuls


def _loop_of_matmuls(a):
    def body(i, c):
        return tuple(jnp.tanh(x @ c[(j + 1) % 6]) for j, x in enumerate(c))

    # six distinct carried arrays: the while op's HLO type then prints /*index=5*/
    return sum(lax.fori_loop(0, 3, body, tuple(a + j for j in range(6))))


def test_profile_counts_a_loop_body_once(tmp_path):
    # the trace has an event for the while op that spans the events of its body's ops: only the latter count
    import jax

    a = jnp.ones((64, 64))
    compiled = jax.jit(_loop_of_matmuls).lower(a).compile()
    instrs, comps, labels = profile_step.parse_hlo(compiled.as_text())
    compiled(a).block_until_ready()
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    compiled(a).block_until_ready()
    jax.profiler.stop_trace()
    times = profile_step.op_times(str(tmp_path))
    assert all(op in instrs for op in times), [op for op in times if op not in instrs]
    assert "while" in {instrs[op][0] for op in times}
    body = profile_step.without_control_flow(times, instrs)
    assert "while" not in {instrs[op][0] for op in body}
    assert "matmul" in {profile_step.kind(instrs[op][0], comps.get(instrs[op][2], set())) for op in body}


@pytest.mark.slow
def test_profile_step_end_to_end(tmp_path):
    profile_step.main(["--config", "isotropic_tiny", "--seq_len", "64", "--bytes_per_step", "128", "--steps", "1",
                       "--out", str(tmp_path / "p.json")])
    r = json.load(open(tmp_path / "p.json"))
    assert r["op_ms"] > 0 and any(w.startswith("hnet/attention.py:") for w, _, _ in r["rows"])  # ops attributed to source


@pytest.mark.shared_data
def test_premium_estimator_reproduces_the_documented_parities(tmp_path):
    """benchmarks/premium_estimator.py (issue 19 analysis): the UTF-8 classes' prior-implied overall parity is the
    one docs/multilingual.md reports for the shipped configs (1.68); the two estimators' (1.55, 1.44) are recomputed;
    leaving each seen script out in turn picks the estimate over the class prior (w = 0), and hnet.premium's
    estimate (what magnet_lso_premium_tiny reads) gives 1.46."""
    from tests.helpers import shared_text_path

    shared_text_path("ntrex128", "valid", "tha.txt")
    import premium_estimator

    premium_estimator.main(["--out", str(tmp_path / "p.json")])
    out = json.load(open(tmp_path / "p.json"))
    assert round(out["parity_utf8_classes"], 2) == 1.68 and round(out["parity_estimator"], 2) == 1.55
    assert round(out["parity_inventory"], 2) == 1.44
    loo = out["leave_one_script_out"]
    assert loo["best_weight"] == 0.0 and loo["rms_log_error"]["0.0"] < loo["rms_log_error"]["1.0"] / 2
    assert not {"amh", "hye", "kat", "tha"} & {r["lang"] for r in loo["rows"]}
    assert round(out["parity_cv"], 2) == 1.46
    held = {"amh", "hye", "kat", "tha"}
    assert not held & set(out["fit_languages"]) and {r["lang"] for r in out["rows"]} == held  # fitted on seen text only
