"""MAGNET routing (models/magnet.py, routing 'script' / 'doc' / 'lang'): per-byte selection among all route
predictors on real mixed-script text, per-route priors, prefix causality of per-byte routing in
training mode, decode ≡ forward with routes, and the config training a few steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.boundary_rules import end_to_start
from hnet import sharding
from hnet import dynamic_pooling as dp
from hnet.scripts import (GROUPINGS, LANGUAGE_SETS, NTREX_SCRIPT_GROUPS, SCRIPT_GROUPS, byte_routes,
                          length_class_priors, parity_priors, route_counts, route_length_counts)
from models.common import DTPConfig
from models.dtp import DTPLM
from models.magnet import MagnetLM, route_key
from tests.helpers import packed_row, shared_text_path, stack_rows, to_jnp
from tests.test_dtp import TINY, _decode_all, make_fwd, train_shrunk
from train.eval import mean_of_defined

NAMES = ("latin", "cyrl", "deva", "other")


def routes_for_batch(tokens_BxL, segment_ids_BxL, groups=SCRIPT_GROUPS):
    """The script_routes annotation of packed rows: each segment routed on its own bytes (BOS/EOS included) by
    ``byte_routes``, padding route 0. int32 [B, L]."""
    out = np.zeros(np.shape(tokens_BxL), np.int32)
    for r, (tok, seg) in enumerate(zip(np.asarray(tokens_BxL), np.asarray(segment_ids_BxL))):
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            out[r, idx] = byte_routes(tok[idx].astype(np.uint8).tobytes(), groups)
    return out


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
    model = MagnetLM(DTPConfig(**TINY, routing="script", route_names=NAMES, priors=(0.2, 0.1, 0.08, 0.12)), seed=4)
    train_fwd, state = make_fwd(model, False)
    forced = nnx.clone(model)
    forced.predictor.w2[...] = jnp.zeros_like(forced.predictor.w2[...])
    forced.predictor.b2[...] = jnp.array([20.0, -20.0, 20.0, -20.0])
    return {"model": model, "state": state, "train": train_fwd, "forced_state": nnx.split(forced)[1]}


@pytest.mark.shared_data
def test_script_router_selects_per_byte(routed):
    batch = _batch()
    routes = batch["script_routes"]
    real = batch["segment_ids"] > 0
    assert {0, 1, 2, 3} <= set(routes[real].tolist())  # all four groups occur in the text
    _, b, _ = routed["train"](routed["forced_state"], to_jnp(batch))
    e_want = np.isin(routes, [0, 2]) & real
    b_want = np.asarray(end_to_start(jnp.asarray(e_want), jnp.asarray(batch["segment_ids"]))) & real
    np.testing.assert_array_equal(np.asarray(b), b_want)


@pytest.mark.shared_data
def test_per_route_bytes_per_chunk_is_nan_for_a_route_absent_from_the_batch(routed):
    """English-only rows have no Cyrillic/Devanagari bytes: those routes' bytes_per_chunk is undefined (nan,
    never 0), and the eval average skips it."""
    doc = _mixed_doc()
    eng = doc[:doc.index(b"\n")]
    batch = stack_rows([packed_row([eng], 64), packed_row([eng[10:]], 64)])
    batch["script_routes"] = routes_for_batch(batch["inputs"], batch["segment_ids"]).astype(np.int32)
    graphdef, _ = nnx.split(routed["model"])
    metrics = jax.jit(lambda st, b: nnx.merge(graphdef, st)(b).metrics)(routed["forced_state"], to_jnp(batch))
    assert float(metrics["bytes_per_chunk_latin"]) >= 1.0
    assert np.isnan(float(metrics["bytes_per_chunk_cyrl"])) and np.isnan(float(metrics["bytes_per_chunk_deva"]))
    assert mean_of_defined([float(metrics["bytes_per_chunk_cyrl"]), 4.0, 6.0]) == 5.0
    assert np.isnan(mean_of_defined([float(metrics["bytes_per_chunk_cyrl"])]))


@pytest.mark.shared_data
def test_per_route_prior_counts_only_that_routes_bytes():
    batch = _batch()
    real = jnp.asarray(batch["segment_ids"] > 0)
    route = jnp.asarray(batch["script_routes"])
    e_st = (route == 0).astype(jnp.float32)  # closes exactly the latin bytes
    total, loss_R, _ = dp.route_binomial_loss(e_st, route, real, (0.2, 0.1, 0.08, 0.12))
    # latin: k = n in every row -> -ln(0.2^n)/n = -ln 0.2 ; other routes: k = 0 -> -ln(1-α)
    np.testing.assert_allclose(np.asarray(loss_R), -np.log([0.2, 0.9, 0.92, 0.88]), rtol=1e-5)


@pytest.mark.shared_data
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


@pytest.mark.shared_data
def test_decode_step_with_routes_matches_forward(routed):
    batch = to_jnp(_batch())
    eval_fwd = make_fwd(routed["model"], True)[0]
    lf, bf, _ = eval_fwd(routed["state"], batch)
    ld = _decode_all(routed["model"], batch, routes="script_routes")
    real = np.asarray(batch["segment_ids"]) > 0
    np.testing.assert_allclose(np.asarray(ld)[real], np.asarray(lf)[real], atol=1e-4)
    assert 0 < int(np.asarray(bf).sum())


@pytest.mark.shared_data
def test_doc_routes_annotation_is_the_dominant_script():
    from train.annotations import annotate

    docs = []
    for lang in ("eng", "rus", "hin"):
        with open(shared_text_path("ntrex128", "valid", f"{lang}.txt"), "rb") as f:
            docs.append(f.read().split(b"\n")[0])
    per_doc = [np.unique(annotate(d, ("doc_routes",))["doc_routes"]).tolist() for d in docs]
    assert per_doc == [[0], [1], [2]]


NTREX_NAMES = tuple(NTREX_SCRIPT_GROUPS)


def _ntrex_lines(langs, n_lines=1):
    out = {}
    for lang in langs:
        with open(shared_text_path("ntrex128", "valid", f"{lang}.txt"), "rb") as f:
            out[lang] = b"\n".join(f.read().split(b"\n")[:n_lines])
    return out


@pytest.mark.shared_data
def test_ntrex_grouping_annotations_and_route_key():
    """'script_routes_ntrex' = the framed per-byte NTREX routes; 'doc_routes_ntrex' = each language's own
    script (jpn: kana); a model with script_groups 'ntrex' reads them (forced predictors: only the
    grek and deva routes close, so the boundaries follow the NTREX routes, not the MAGNET ones)."""
    from train.annotations import annotate

    docs = _ntrex_lines(("ell", "hin", "jpn", "eng"))
    ann = [annotate(d, ("script_routes_ntrex", "doc_routes_ntrex", "script_routes")) for d in docs.values()]
    for a, d in zip(ann, docs.values()):
        r = byte_routes(d, NTREX_SCRIPT_GROUPS)
        np.testing.assert_array_equal(a["script_routes_ntrex"], np.r_[0, r, r[-1]])
    labels = [NTREX_NAMES[int(a["doc_routes_ntrex"][0])] for a in ann]
    assert labels == ["grek", "deva", "kana", "latin"]
    assert route_key("script", "ntrex") == "script_routes_ntrex" and route_key("doc") == "doc_routes"

    priors = tuple(0.1 for _ in NTREX_NAMES)
    with pytest.raises(ValueError):  # names of the other grouping
        MagnetLM(DTPConfig(**TINY, routing="script", script_groups="ntrex", route_names=NAMES, priors=(0.1,) * 4))
    model = MagnetLM(DTPConfig(**TINY, routing="script", script_groups="ntrex", route_names=NTREX_NAMES,
                               priors=priors), seed=5)
    model.predictor.w2[...] = jnp.zeros_like(model.predictor.w2[...])
    model.predictor.b2[...] = jnp.where(jnp.isin(jnp.arange(len(NTREX_NAMES)), jnp.array([2, 5])), 20.0, -20.0)
    doc = b" ".join(d[:50] for d in docs.values())
    batch = stack_rows([packed_row([doc], 256)])
    batch["script_routes_ntrex"] = routes_for_batch(batch["inputs"], batch["segment_ids"],
                                                    NTREX_SCRIPT_GROUPS).astype(np.int32)
    _, b, _ = make_fwd(model, False)[0](nnx.split(model)[1], to_jnp(batch))
    real = batch["segment_ids"] > 0
    e_want = np.isin(batch["script_routes_ntrex"], [2, 5]) & real
    assert e_want.sum() > 20
    b_want = np.asarray(end_to_start(jnp.asarray(e_want), jnp.asarray(batch["segment_ids"]))) & real
    np.testing.assert_array_equal(np.asarray(b), b_want)


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.parametrize("gin_file", ["configs/magnet_tiny.gin", "configs/magnet_lang_tiny.gin"])
def test_magnet_config_priors_are_the_ntrex_parity_priors(gin_file, gin_clean):
    """The configs' priors = hnet.scripts.parity_priors on ntrex128/train (3 decimals): per script route
    (magnet_tiny) and per language (magnet_lang_tiny: one route per language, α_l = 0.2 B_eng / B_l)."""
    import glob
    import os

    import gin

    from train import config

    paths = sorted(glob.glob(os.path.join(os.path.dirname(shared_text_path("ntrex128", "train", "eng.txt")), "*.txt")))
    langs = [os.path.basename(p)[:-4] for p in paths]
    docs = []
    for p in paths:
        with open(p, "rb") as f:
            docs.append(f.read())
    config.parse([gin_file, "configs/runs/ntrex_multilingual.gin"], [])
    cfg = gin.get_configurable("models.DTPConfig")()
    if cfg.routing == "lang":
        assert tuple(cfg.route_names) == LANGUAGE_SETS["ntrex"] == tuple(langs)
        counts = np.diag([len(d) for d in docs])
    else:
        assert tuple(cfg.route_names) == NTREX_NAMES and cfg.script_groups == "ntrex"
        counts = route_counts(docs, NTREX_SCRIPT_GROUPS)
    np.testing.assert_allclose(cfg.priors, parity_priors(counts, langs.index("eng"), 0.2), atol=5e-4)


@pytest.mark.shared_data
def test_lang_routing_follows_the_file_label_not_the_script(tmp_path):
    """'lang_routes_ntrex' = the index of the source file's stem, for every document of the file; a
    file named otherwise is an error. A 'lang'-routed model whose 'hin' predictor always closes and all
    others never: evaluated through train.multilingual_eval (which must pass each file's path), the
    same English line closes every byte when stored as hin.txt and none when stored as eng.txt."""
    import dataclasses as dc

    from train import data as data_lib
    from train.annotations import annotate
    from train.eval import evaluate_languages
    from train.loop import build_state
    from train.optim import OptimizerConfig

    langs = LANGUAGE_SETS["ntrex"]
    eng = _ntrex_lines(("eng",), 4)["eng"]
    (tmp_path / "eng.txt").write_bytes(eng)
    (tmp_path / "hin.txt").write_bytes(eng)
    docs, _ = data_lib.load_documents(data_lib.DataConfig(sources=(str(tmp_path / "*.txt"),), byte_range=(0.0, 1.0),
                                                          doc_split="line"))
    assert [d.source for d in docs] == [str(tmp_path / "eng.txt")] * 4 + [str(tmp_path / "hin.txt")] * 4
    per_doc = [np.unique(annotate(d, ("lang_routes_ntrex",))["lang_routes_ntrex"]).tolist() for d in docs]
    assert per_doc == [[langs.index("eng")]] * 4 + [[langs.index("hin")]] * 4
    (tmp_path / "english.txt").write_bytes(eng)
    with pytest.raises(data_lib.DataError, match="english.txt"):
        annotate(data_lib.load_documents(dc.replace(
            data_lib.DataConfig(), sources=(str(tmp_path / "english.txt"),), byte_range=(0.0, 1.0)))[0][0],
            ("lang_routes_ntrex",))
    (tmp_path / "english.txt").unlink()

    assert route_key("lang", "ntrex") == "lang_routes_ntrex"
    cfg = DTPConfig(**TINY, routing="lang", script_groups="ntrex", route_names=langs, priors=(0.1,) * len(langs))
    model = MagnetLM(cfg, seed=0)
    model.predictor.w2[...] = jnp.zeros_like(model.predictor.w2[...])
    model.predictor.b2[...] = jnp.where(jnp.arange(len(langs)) == langs.index("hin"), 20.0, -20.0)
    setup = build_state(lambda: model, OptimizerConfig(), 10, sharding.make_mesh({"data": -1}))
    eval_cfg = dc.replace(data_lib.DataConfig(), seq_len=64, batch_size=4, annotations=("lang_routes_ntrex",))
    res = evaluate_languages(setup, eval_cfg, str(tmp_path))["languages"]
    assert res["hin"]["boundary_rate"] > 0.95 and res["eng"]["boundary_rate"] < 0.1, res


@pytest.mark.shared_data
def test_multilingual_eval_counts_chunks_per_english_byte(tmp_path):
    """evaluate_languages on 9 parallel files (MAGNET's languages, 3 lines each): per-language chunks /
    English bytes, parity max/min over all and over MAGNET's nine, NTREX script labels."""
    import dataclasses as dc

    from train import data as data_lib
    from train.eval import MAGNET_LANGUAGES, evaluate_languages
    from train.loop import build_state
    from train.optim import OptimizerConfig

    for lang, text in _ntrex_lines(MAGNET_LANGUAGES, 3).items():
        (tmp_path / f"{lang}.txt").write_bytes(text)
    cfg = DTPConfig(**TINY, priors=(0.3,))
    setup = build_state(lambda: DTPLM(cfg, seed=0), OptimizerConfig(), 10, sharding.make_mesh({"data": -1}))
    eval_cfg = dc.replace(data_lib.DataConfig(), seq_len=64, batch_size=4)
    res = evaluate_languages(setup, eval_cfg, str(tmp_path))
    langs = res["languages"]
    assert set(langs) == set(MAGNET_LANGUAGES)
    eng_bytes = (tmp_path / "eng.txt").stat().st_size
    for lang, m in langs.items():
        assert m["file_bytes"] == (tmp_path / f"{lang}.txt").stat().st_size
        assert m["chunks_per_eng_byte"] == pytest.approx(m["n_chunks"] / eng_bytes)
        assert m["bytes_per_chunk"] == pytest.approx(m["n_positions"] / m["n_chunks"]) == 1 / m["boundary_rate"]
        assert m["n_positions"] == m["file_bytes"] + 1  # BOS + bytes (EOS is never an input)
        assert 0 < m["bpb"] < 12
    cpe = [m["chunks_per_eng_byte"] for m in langs.values()]
    assert res["parity_max_over_min"] == pytest.approx(max(cpe) / min(cpe))
    assert res["parity_max_over_min_magnet9"] == pytest.approx(res["parity_max_over_min"])
    assert langs["hin"]["script"] == "deva" and langs["ben"]["script"] == "beng" and langs["rus"]["script"] == "cyrl"
    assert res["scripts"]["cyrl"]["languages"] == ["bel", "rus", "ukr"]


@pytest.mark.shared_data
@pytest.mark.slow
def test_magnet_config_trains_with_falling_loss(tmp_path):
    res = train_shrunk("configs/magnet_tiny.gin", "configs/runs/ntrex_multilingual.gin", str(tmp_path))
    losses = [h["ce"] for h in res["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.03, losses  # 22 languages: slower than pydoc
    assert "bytes_per_chunk_latin" in res["history"][-1]


# ------------------------------------------------------------------------------------------------
# Leave-scripts-out protocol (issue 19): catch-all 'other' vs the catch-all split by UTF-8 length
# ------------------------------------------------------------------------------------------------

LSO_LANGS = ("kat", "eng", "amh", "hye", "rus", "tha")  # four held-out scripts (2- and 3-byte) + two seen


@pytest.mark.shared_data
def test_lso_utf8_decode_step_matches_forward():
    """Decoding ≡ forward (eval rule) for MAGNET with the catch-all split by UTF-8 length, on real text of the
    held-out scripts; the routes the generation trackers (``decode_trackers``) compute byte by byte equal the
    annotation's."""
    groups = "ntrex_lso_utf8"
    names = tuple(GROUPINGS[groups])
    model = MagnetLM(DTPConfig(**TINY, routing="script", script_groups=groups, route_names=names,
                               priors=tuple(np.linspace(0.08, 0.25, len(names)))), seed=6)
    parts = [d.decode()[:16].encode() for d in _ntrex_lines(LSO_LANGS).values()]
    doc = b" ".join(parts)
    batch = stack_rows([packed_row([b" ".join(parts[:3]), b" ".join(parts[3:])], 256), packed_row([doc], 256)])
    key = route_key("script", groups)
    batch[key] = routes_for_batch(batch["inputs"], batch["segment_ids"], GROUPINGS[groups]).astype(np.int32)
    real = batch["segment_ids"] > 0
    assert {"other2", "other3"} <= {names[r] for r in batch[key][real]}
    tracker = model.decode_trackers([b""])[0]
    n = len(doc) + 1  # BOS + document
    assert [tracker.push(int(t)) for t in batch["inputs"][1, :n]] == batch[key][1, :n].tolist()

    jb = to_jnp(batch)
    lf, bf, _ = make_fwd(model, True)[0](nnx.split(model)[1], jb)
    ld = _decode_all(model, jb, routes=key)
    np.testing.assert_allclose(np.asarray(ld)[real], np.asarray(lf)[real], atol=1e-4)
    assert 0 < int(np.asarray(bf).sum())


@pytest.mark.shared_data
@pytest.mark.parametrize("gin_file", ["configs/magnet_lso_tiny.gin", "configs/magnet_lso_utf8_tiny.gin"])
def test_lso_config_priors_are_recomputed_from_the_seen_languages(gin_file, gin_clean):
    """The leave-scripts-out configs' priors (3 decimals) = parity_priors on the run file's 18 training files (the
    held-out languages' bytes are never used); the UTF-8 length classes' = length_class_priors of those."""
    import gin

    from train import config
    from train.sources import shared_path

    config.parse([gin_file, "configs/runs/ntrex_leave_scripts_out.gin"], [])
    sources = gin.query_parameter("%LSO_TRAIN")
    langs = [s.rsplit("/", 1)[1][:-4] for s in sources]
    assert len(langs) == 18 and not {"kat", "hye", "amh", "tha"} & set(langs)
    assert gin.query_parameter("train/train.DataConfig.sources").scoped_configurable_fn() == sources  # the macro
    docs = []
    for s in sources:
        with open(shared_path(s[len("shared:"):]), "rb") as f:
            docs.append(f.read())
    cfg = gin.get_configurable("models.DTPConfig")()
    groups = GROUPINGS[cfg.script_groups]
    assert tuple(cfg.route_names) == tuple(groups)
    if cfg.script_groups == "ntrex_lso":
        assert tuple(groups) == tuple(k for k in NTREX_NAMES if k not in ("thai", "ethi", "geor", "armn"))
        want = parity_priors(route_counts(docs, groups), langs.index("eng"))
    else:  # seen routes as in ntrex_lso, then the classes from the seen routes of each UTF-8 length
        base = GROUPINGS["ntrex_lso"]
        seen = parity_priors(route_counts(docs, base), langs.index("eng"))[:-1]
        classes = length_class_priors(seen, route_length_counts(docs, base)[:-1], (2, 3, 4))
        want = np.r_[seen, classes]
    np.testing.assert_allclose(cfg.priors, want, atol=5e-4)


# ------------------------------------------------------------------------------------------------
# A catch-all that reads the document's byte premium (hnet/premium.py; configs/magnet_lso_premium_tiny.gin)
# ------------------------------------------------------------------------------------------------

PREMIUM = dict(premium_routes=("other2", "other3", "other4"), premium_model="ntrex_lso", premium_scale=0.246)


def _premium_model(seed=7, **premium):
    groups = "ntrex_lso_utf8"
    names = tuple(GROUPINGS[groups])
    return MagnetLM(DTPConfig(**TINY, routing="script", script_groups=groups, route_names=names,
                              priors=tuple(np.linspace(0.08, 0.25, len(names))), **premium), seed=seed)


def _annotated_rows(row_docs, L, names):
    """Packed rows with the pipeline's own annotations (``train.annotations.annotate``, framed per document)."""
    from train.annotations import annotate

    rows = []
    for docs in row_docs:
        row = packed_row(docs, L)
        for name in names:
            a = np.concatenate([annotate(d, (name,))[name] for d in docs])
            row[name] = np.pad(a, (0, L - len(a)))
        rows.append(row)
    return stack_rows(rows)


@pytest.mark.shared_data
def test_premium_catch_all_decode_step_matches_forward():
    """The premium catch-all on real text of held-out scripts: the generation trackers give, byte by byte, the
    route and premium annotations; decoding ≡ forward (eval rule); and the class routes' bytes did start from
    priors of their own (the estimate exists and moves their logits)."""
    model = _premium_model(**PREMIUM)
    lines = _ntrex_lines(LSO_LANGS)
    docs = [lines["kat"][:150], lines["amh"][:90] + b" " + lines["eng"][:40], lines["tha"][:120] + lines["hye"][:60]]
    key, pkey = route_key("script", "ntrex_lso_utf8"), "premium_ntrex_lso"
    assert model.required_annotations() == (key, pkey)
    batch = _annotated_rows([docs[:2], docs[2:]], 512, (key, pkey))
    real = batch["segment_ids"] > 0
    tracker = model.decode_trackers([b""])[0]
    n = len(docs[2]) + 2  # BOS + document + EOS
    pushed = np.array([tracker.push(int(t)) for t in batch["inputs"][1, :n]])
    assert pushed[:, 0].tolist() == batch[key][1, :n].tolist()
    np.testing.assert_array_equal(pushed[:, 1].astype(np.float32), batch[pkey][1, :n])

    jb = to_jnp(batch)
    names = model.config.route_names
    est = np.isin(batch[key], [names.index(r) for r in PREMIUM["premium_routes"]]) & (batch[pkey] > 0)
    assert est.sum() > 200
    h = jnp.zeros((2, 512, model.config.d_model))
    moved = np.abs(np.asarray(model.route_logit(h, jb[key], jb[pkey])[0] - dp.select_route(model.predictor(h), jb[key])))
    moved = moved > 1e-3
    assert (moved == est).all()

    side = np.stack([batch[key], batch[pkey]], -1)
    lf, bf, _ = make_fwd(model, True)[0](nnx.split(model)[1], jb)
    ld = _decode_all(model, dict(jb, side=jnp.asarray(side)), routes="side")
    np.testing.assert_allclose(np.asarray(ld)[real], np.asarray(lf)[real], atol=1e-4)
    assert 0 < int(np.asarray(bf).sum())


def test_premium_prior_is_the_starting_rate_and_the_binomial_target():
    """With the predictors' weights zeroed, an estimated byte's probability is c / π̂ exactly, every other
    byte's its route's α_r; the binomial prior of a route counts the mean of its bytes' α_t per row."""
    model = _premium_model(**PREMIUM)
    model.predictor.w2[...] = jnp.zeros_like(model.predictor.w2[...])
    names = model.config.route_names
    route = jnp.asarray([[0, 13, 13, 12, 14], [13, 13, 0, 0, 12]], jnp.int32)  # latin, other3, other2, other4
    premium = jnp.asarray([[2.0, 2.0, 0.0, 1.5, 3.0], [1.2, 4.0, 2.0, 0.0, 0.0]], jnp.float32)
    h = jnp.zeros((2, 5, model.config.d_model))
    logit, alpha = model.route_logit(h, route, premium)
    alpha_r = np.asarray(model.config.priors)[np.asarray(route)]
    want = np.where((np.asarray(route) >= names.index("other2")) & (np.asarray(premium) > 0),
                    0.246 / np.where(np.asarray(premium) > 0, np.asarray(premium), 1), alpha_r)
    np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(logit)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(alpha), want, rtol=1e-6)
    real = jnp.ones((2, 5), bool)
    e = jnp.zeros((2, 5))
    _, loss_R, _ = dp.route_binomial_loss(e, route, real, model.config.priors, alpha)
    # k = 0: -log(1 - α)^n / n = -log(1 - mean α) per row with the route; other3: rows' means 0.123, 0.1640
    a3 = [np.mean(want[0, 1:3]), np.mean(want[1, :2])]
    np.testing.assert_allclose(float(loss_R[13]), np.mean([-np.log1p(-a) for a in a3]), rtol=1e-5)
    plain = _premium_model()  # not opted in: no per-byte priors, the route's α_r
    assert plain.route_logit(h, route, premium)[1] is None


@pytest.mark.shared_data
def test_premium_catch_all_is_causal_in_training_mode():
    """Training mode with noise: a document cut anywhere (inside UTF-8 characters too), re-annotated on its own
    bytes, gives the full document's logits and boundaries up to the cut."""
    model = _premium_model(seed=8, **PREMIUM)
    lines = _ntrex_lines(LSO_LANGS)
    doc = lines["kat"][:120] + b" " + lines["amh"][:100]
    key, pkey = route_key("script", "ntrex_lso_utf8"), "premium_ntrex_lso"
    cuts = [20, 60, 61, 62, 130, 131, len(doc)]  # kat letters are 3 bytes: 61, 62 cut inside one
    full = _annotated_rows([[doc]] * len(cuts), 512, (key, pkey))
    pre = _annotated_rows([[doc[:c]] for c in cuts], 512, (key, pkey))
    assert (pre[pkey][:, 60:] > 0).any() and (full[pkey] > 0).sum() > 100
    train_fwd, state = make_fwd(model, False)
    lf, bf, _ = train_fwd(state, to_jnp(full))
    lp, bp, _ = train_fwd(state, to_jnp(pre))
    for i, c in enumerate(cuts):
        np.testing.assert_allclose(np.asarray(lp[i, :c + 1]), np.asarray(lf[i, :c + 1]), atol=2e-5)
        assert (np.asarray(bp[i, :c + 1]) == np.asarray(bf[i, :c + 1])).all()


@pytest.mark.shared_data
def test_route_tracker_with_a_document_route_gives_the_premium_annotation():
    """'doc' routing: the tracker keeps the document's route and still estimates the premium byte by byte."""
    from hnet.premium import INVENTORY_MODELS
    from models.magnet import RouteTracker
    from train.annotations import annotate

    doc = _ntrex_lines(("kat",))["kat"][:200]
    tracker = RouteTracker(route=3, premium_model=INVENTORY_MODELS["ntrex_lso"])
    pushed = np.array([tracker.push(int(t)) for t in packed_row([doc], 256)["inputs"][: len(doc) + 2]])
    assert (pushed[:, 0] == 3).all()
    want = annotate(doc, ("premium_ntrex_lso",))["premium_ntrex_lso"]
    np.testing.assert_array_equal(pushed[:, 1].astype(np.float32), want)
    assert (want[60:] > 0).all()
