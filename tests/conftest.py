"""Shared pytest fixtures (kept light: every test module of the project sees this file)."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# The test extra installs libtpu (tests/test_aot.py compiles for TPU topologies); the tests themselves run on
# CPU, and without this every process would first probe for a TPU (slower start, warnings on stderr).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests' time is XLA compilation of tiny models, not their run time: skipping LLVM's backend
# optimisations halves the compile time of e.g. the H-Net gradient graphs. Set before JAX starts; the
# subprocesses the tests start inherit it (append, never replace, XLA_FLAGS there).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


SHARED_DATA_MARKED = [False]  # is the running test marked shared_data? (tests.helpers.shared_text_path checks)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures: record its shared_data marker, so ``-m 'not shared_data'`` can rely on it."""
    SHARED_DATA_MARKED[0] = item.get_closest_marker("shared_data") is not None


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Sources prepared on first use (train.data) go to a per-session cache, not ~/.cache/hnet/data; the
    CLI subprocesses inherit it."""
    os.environ.setdefault("HNET_DATA_CACHE", str(tmp_path_factory.mktemp("data_cache")))


@pytest.fixture
def gin_clean():
    """Clear gin's global config before and after a test that parses or binds gin configs."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def cpu_mesh():
    from hnet.sharding import make_mesh

    return make_mesh()
