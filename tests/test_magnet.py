"""MAGNET routing (models/dtp.py with routing 'script' / 'doc'): per-byte selection among all route
predictors on real mixed-script text, per-route priors, prefix causality of per-byte routing in
training mode, decode ≡ forward with routes, and the config training a few steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.boundary_rules import end_to_start
from hnet.scripts import routes_for_batch
from models import dtp_targets as tg
from models.dtp import DTPConfig, DTPLM
from tests.helpers import packed_row, shared_text_path, stack_rows, to_jnp
from tests.test_dtp import TINY, _decode_all, make_fwd

NAMES = ("latin", "cyrl", "deva", "other")


def _mixed_doc(n_lines: int = 1) -> bytes:
    """One real document mixing scripts: line 0 of the NTREX valid files of eng, rus, hin, ell, joined."""
    parts = []
    for lang in ("eng", "rus", "hin", "ell"):
        with open(shared_text_path("ntrex128", "valid", f"{lang}.txt"), "rb") as f:
            parts += f.read().split(b"\n")[:n_lines]
    return b"\n".join(p[:60] for p in parts)


def _batch(L=256):
    doc = _mixed_doc()
    rows = stack_rows([packed_row([doc[:120], doc[120:200]], L), packed_row([doc[60:]], L)])
    rows["script_routes"] = routes_for_batch(rows["inputs"], rows["segment_ids"]).astype(np.int32)
    return rows


@pytest.fixture(scope="module")
def routed():
    """MAGNET per-byte model; the route predictors are forced: latin and deva always close (+20),
    cyrl and other never (-20), so the chosen predictor is visible in the boundaries."""
    model = DTPLM(DTPConfig(**TINY, routing="script", route_names=NAMES, priors=(0.2, 0.1, 0.08, 0.12)), seed=4)
    train_fwd, state = make_fwd(model, False)
    forced = nnx.clone(model)
    forced.predictor.w2[...] = jnp.zeros_like(forced.predictor.w2[...])
    forced.predictor.b2[...] = jnp.array([20.0, -20.0, 20.0, -20.0])
    return {"model": model, "state": state, "train": train_fwd, "forced_state": nnx.split(forced)[1]}


def test_script_router_selects_per_byte(routed):
    batch = _batch()
    routes = batch["script_routes"]
    real = batch["segment_ids"] > 0
    assert {0, 1, 2, 3} <= set(routes[real].tolist())  # all four groups occur in the text
    _, b, _ = routed["train"](routed["forced_state"], to_jnp(batch))
    e_want = np.isin(routes, [0, 2]) & real
    b_want = np.asarray(end_to_start(jnp.asarray(e_want), jnp.asarray(batch["segment_ids"]))) & real
    np.testing.assert_array_equal(np.asarray(b), b_want)


def test_per_route_prior_counts_only_that_routes_bytes():
    batch = _batch()
    real = jnp.asarray(batch["segment_ids"] > 0)
    route = jnp.asarray(batch["script_routes"])
    e_st = (route == 0).astype(jnp.float32)  # closes exactly the latin bytes
    total, loss_R, _ = tg.route_binomial_loss(e_st, route, real, (0.2, 0.1, 0.08, 0.12))
    # latin: k = n in every row -> -ln(0.2^n)/n = -ln 0.2 ; other routes: k = 0 -> -ln(1-α)
    np.testing.assert_allclose(np.asarray(loss_R), -np.log([0.2, 0.9, 0.92, 0.88]), rtol=1e-5)


def test_prefix_causality_per_byte_routing(routed):
    """Training mode with noise: prefix rows (the rest padded, routes recomputed on the prefix bytes
    only) reproduce the full rows' logits and boundaries, including cuts inside UTF-8 characters."""
    full = _batch()
    row = {k: v[1:2] for k, v in full.items()}
    seq = row["inputs"][0][row["segment_ids"][0] > 0]
    cuts = [5, 61, 62, 63, 130, int(len(seq))]  # 61..63 fall inside Cyrillic / Devanagari characters
    rows_full = {k: np.repeat(v, len(cuts), 0) for k, v in row.items()}
    rows_pre = {k: v.copy() for k, v in rows_full.items()}
    for i, c in enumerate(cuts):
        for k in rows_pre:
            rows_pre[k][i, c:] = 0
    rows_pre["script_routes"] = routes_for_batch(rows_pre["inputs"], rows_pre["segment_ids"]).astype(np.int32)
    lf, bf, _ = routed["train"](routed["state"], to_jnp(rows_full))
    lp, bp, _ = routed["train"](routed["state"], to_jnp(rows_pre))
    for i, c in enumerate(cuts):
        np.testing.assert_allclose(np.asarray(lp[i, :c]), np.asarray(lf[i, :c]), atol=2e-5)
        assert (np.asarray(bp[i, :c]) == np.asarray(bf[i, :c])).all()


def test_decode_step_with_routes_matches_forward(routed):
    batch = to_jnp(_batch())
    eval_fwd = make_fwd(routed["model"], True)[0]
    lf, bf, _ = eval_fwd(routed["state"], batch)
    ld = _decode_all(routed["model"], batch, routes="script_routes")
    real = np.asarray(batch["segment_ids"]) > 0
    np.testing.assert_allclose(np.asarray(ld)[real], np.asarray(lf)[real], atol=1e-4)
    assert 0 < int(np.asarray(bf).sum())


def test_doc_routes_annotation_is_the_dominant_script():
    from train.data import ByteStream

    docs = []
    for lang in ("eng", "rus", "hin"):
        with open(shared_text_path("ntrex128", "valid", f"{lang}.txt"), "rb") as f:
            docs.append(f.read().split(b"\n")[0])
    s = ByteStream.from_documents(docs, ("doc_routes",))
    per_doc = [np.unique(s.extra["doc_routes"][s.doc_ids == i]).tolist() for i in range(3)]
    assert per_doc == [[0], [1], [2]]


@pytest.mark.slow
def test_magnet_config_trains_with_falling_loss(tmp_path):
    from train import config
    from train.loop import train

    config.parse(["configs/magnet_tiny.gin", "configs/runs/ntrex_multilingual.gin"],
                 ["TRAIN_STEPS=12", "SEQ_LEN=64", "BATCH=4", "models.DTPConfig.d_model=32",
                  "models.DTPConfig.d_ff=64", "models.DTPConfig.num_heads=2", "models.DTPConfig.pre_layout='T1'",
                  "models.DTPConfig.inner_layout='T1'", "models.DTPConfig.post_layout='T1'",
                  "train.OptimizerConfig.warmup_steps=2", "train.train.log_every=1",
                  "train.train.sample_prompts=()", "eval/train.DataConfig.max_windows=4"])
    res = train(workdir=str(tmp_path))
    losses = [h["ce"] for h in res["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.03, losses  # 22 languages: slower than pydoc
    assert "bytes_per_chunk_latin" in res["history"][-1]
