"""Every .gin file under configs/ parses (model files composed with the default run file) and builds its
model abstractly; bad bindings raise ConfigError naming the parameter and listing the valid ones."""

from __future__ import annotations

import glob
import os

import gin
import jax
import pytest
from flax import nnx

from hnet.sharding import make_mesh, mesh_context
from tests.helpers import REPO_ROOT
from train.config import ConfigError, parse

CONFIGS = os.path.join(REPO_ROOT, "configs")
DEFAULT_RUN = os.path.join(CONFIGS, "runs", "default.gin")
ALL_GIN = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.gin"), recursive=True))
RUN_FILES = [p for p in ALL_GIN if os.sep + "runs" + os.sep in p]
SWEEP_FILES = [p for p in ALL_GIN if os.sep + "sweeps" + os.sep in p]
MODEL_FILES = [p for p in ALL_GIN if p not in RUN_FILES + SWEEP_FILES]
TINY = os.path.join(CONFIGS, "isotropic_tiny.gin")


def _rel(p):
    return os.path.relpath(p, REPO_ROOT)


def test_configs_found():
    assert DEFAULT_RUN in RUN_FILES and TINY in MODEL_FILES


def _abstract_model():
    """Build the configured model abstractly (no FLOPs): proves every model binding is valid."""
    factory = gin.query_parameter("train.train.model").scoped_configurable_fn
    with mesh_context(make_mesh()):
        model = nnx.eval_shape(factory)
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=_rel)
def test_model_file_composes_with_default_run(model_file, gin_clean):
    parse([model_file, DEFAULT_RUN], [])
    assert gin.query_parameter("train.train.steps") is not None
    ref = gin.query_parameter("train.train.model")
    assert isinstance(ref, gin.config.ConfigurableReference), ref
    if "tiny" in os.path.basename(model_file):  # tracing the L/XL models costs seconds each: tiny ones only
        assert _abstract_model() > 0


@pytest.mark.parametrize("run_file", RUN_FILES, ids=_rel)
def test_run_file_composes_with_tiny_model(run_file, gin_clean):
    parse([TINY, run_file], [])
    assert gin.query_parameter("train.train.train_data") is not None
    assert _abstract_model() > 0


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=_rel)
def test_sweep_file_names_existing_configs_and_composes(sweep_file, gin_clean):
    from train.sweep import expand, load_sweep

    if "sweep.Sweep.name" not in open(sweep_file).read():  # a shared fragment: some sweep must include it
        includers = [f for f in SWEEP_FILES if f"include '{_rel(sweep_file)}'" in open(f).read()]
        assert includers, f"{_rel(sweep_file)} binds no sweep name and no sweep file includes it"
        return
    sw = load_sweep(sweep_file)
    runs = expand(sw, "/tmp/unused")
    assert len(runs) == len(sw.models) * len(sw.variants) * len(sw.seeds) > 0
    for model in sw.models:
        gin.clear_config()
        own = list(sw.model_bindings.get(model, ()))
        parse([os.path.join(REPO_ROOT, model), *(os.path.join(REPO_ROOT, f) for f in sw.run_files)],
              own + [b for bindings in sw.variants.values() for b in bindings])
        assert gin.query_parameter("train.train.model") is not None
        for b in own:  # a model's own bindings (FLOPs matching) name parameters of that model
            key, value = (x.strip() for x in b.split("=", 1))
            assert gin.query_parameter(key) == gin.config.parse_value(value)


def test_cli_style_overrides_take_effect(gin_clean):
    parse([TINY, DEFAULT_RUN], ["TRAIN_STEPS = 20", "hnet.StackConfig.d_model = 64"])
    assert gin.query_parameter("%TRAIN_STEPS") == 20
    assert gin.query_parameter("hnet.StackConfig.d_model") == 64
    n64 = _abstract_model()
    parse([TINY, DEFAULT_RUN], [])
    assert gin.query_parameter("%TRAIN_STEPS") == 300  # configs/runs/default.gin
    assert _abstract_model() > n64  # the default (d_model 128) is larger


def test_unknown_parameter_lists_valid_parameters(gin_clean):
    with pytest.raises(ConfigError) as e:
        parse([TINY, DEFAULT_RUN], ["train.train.stepz = 3"])
    msg = str(e.value)
    assert "stepz" in msg
    assert "valid parameters of train.train" in msg
    for p in ("steps", "checkpoint_every", "train_data", "log_every"):
        assert p in msg


def test_unknown_dataclass_field_lists_valid_fields(gin_clean):
    with pytest.raises(ConfigError) as e:
        parse([TINY, DEFAULT_RUN], ["hnet.StackConfig.d_modle = 3"])
    msg = str(e.value)
    assert "d_modle" in msg and "d_model" in msg and "num_heads" in msg and "layout" in msg


def test_unknown_configurable_lists_known_ones(gin_clean):
    with pytest.raises(ConfigError) as e:
        parse([TINY, DEFAULT_RUN], ["train.trian.steps = 3"])
    msg = str(e.value)
    assert "trian" in msg and "known configurables" in msg and "train.train" in msg


def test_typo_inside_a_gin_file_names_the_parameter(tmp_path, gin_clean):
    with open(DEFAULT_RUN) as f:
        text = f.read()
    assert "train.train.log_every" in text
    bad = tmp_path / "bad_run.gin"
    bad.write_text(text.replace("train.train.log_every", "train.train.log_evry"))
    with pytest.raises(ConfigError) as e:
        parse([TINY, str(bad)], [])
    msg = str(e.value)
    assert "log_evry" in msg and "log_every" in msg
    assert "bad_run.gin" in msg


def test_missing_gin_file_is_an_error(tmp_path, gin_clean):
    with pytest.raises((ConfigError, OSError)):
        parse([str(tmp_path / "no_such.gin")], [])
