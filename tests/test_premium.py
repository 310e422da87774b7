"""hnet/premium.py: a document's byte premium estimated causally from its own prefix (issue 19): the counts by
hand, prefix stability (cuts inside characters, invalid bytes), the cap on the inventory, and the coefficients
and scale the leave-scripts-out config ships, recomputed from the 18 training files."""

from __future__ import annotations

import numpy as np
import pytest

from hnet.premium import INVENTORY_LETTERS, INVENTORY_MODELS, MIN_LETTERS, fit_inventory_model, letter_inventory, \
    premium_estimates
from hnet.scripts import parity_scale, route_counts, NTREX_LSO_GROUPS
from tests.helpers import shared_text_path


def test_letter_inventory_counts_by_hand():
    doc = "ab a.\u03b2\u03b2\u10d0".encode()  # a b ␣ a . β β ა: 2-byte β, 3-byte ა
    n, d, c = letter_inventory(doc)
    # bytes: a b ␣ a . β(2) β(2) ა(3); a character counts from its last byte on
    assert n.tolist() == [1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 5, 6]
    assert d.tolist() == [1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4]
    assert c.tolist() == [1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 7, 8]


def test_invalid_bytes_are_no_characters():
    n, d, c = letter_inventory(b"a\xffb\xe1\x83")  # a stray 0xFF, then a 3-byte lead cut after 2 bytes
    assert n.tolist() == [1, 1, 2, 2, 2] and c.tolist() == [1, 1, 2, 2, 2] and d.tolist() == n.tolist()


def test_the_inventory_stops_at_its_letters():
    doc = ("".join(chr(0x3041 + i % 80) for i in range(INVENTORY_LETTERS + 200))).encode()  # hiragana
    n, d, c = letter_inventory(doc)
    assert n[-1] == INVENTORY_LETTERS and d[-1] == 80 and c[-1] == INVENTORY_LETTERS + 200
    p = premium_estimates(doc, INVENTORY_MODELS["ntrex_lso"])
    assert (p[:3 * MIN_LETTERS - 1] == 0).all() and (p[3 * MIN_LETTERS - 1:] > 0).all()  # from the 16th letter


@pytest.mark.shared_data
@pytest.mark.parametrize("lang", ["kat", "amh", "tha", "eng"])
def test_estimates_are_prefix_stable(lang):
    with open(shared_text_path("ntrex128", "valid", f"{lang}.txt"), "rb") as f:
        doc = f.read()[:3000] + b"\xff\xc3" + "\u10d0".encode()
    full = premium_estimates(doc, INVENTORY_MODELS["ntrex_lso"])
    assert (full[-100:] > 0).all()
    for k in (1, 2, 47, 48, 49, 50, 1001, 2999, 3001, 3002, 3003, len(doc)):  # inside characters too
        np.testing.assert_array_equal(premium_estimates(doc[:k], INVENTORY_MODELS["ntrex_lso"]), full[:k])


@pytest.mark.shared_data
def test_the_shipped_model_and_scale_are_recomputed_from_the_seen_languages(gin_clean):
    """INVENTORY_MODELS['ntrex_lso'] = fit_inventory_model on the leave-scripts-out run's 18 training files (6
    decimals), and magnet_lso_premium_tiny's premium_scale = parity_scale on them (3 decimals)."""
    import gin

    from train import config
    from train.sources import shared_path

    config.parse(["configs/magnet_lso_premium_tiny.gin", "configs/runs/ntrex_leave_scripts_out.gin"], [])
    sources = gin.query_parameter("%LSO_TRAIN")
    langs = [s.rsplit("/", 1)[1][:-4] for s in sources]
    assert len(langs) == 18 and not {"kat", "hye", "amh", "tha"} & set(langs)
    docs = []
    for s in sources:
        with open(shared_path(s[len("shared:"):]), "rb") as f:
            docs.append(f.read())
    cfg = gin.get_configurable("models.DTPConfig")()
    assert cfg.premium_model == "ntrex_lso"
    np.testing.assert_allclose(INVENTORY_MODELS["ntrex_lso"], fit_inventory_model(docs, langs.index("eng")), atol=2e-6)
    scale = parity_scale(route_counts(docs, NTREX_LSO_GROUPS), langs.index("eng"))
    assert cfg.premium_scale == pytest.approx(scale, abs=5e-4)
