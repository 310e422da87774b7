"""Shared pytest fixtures (kept light: every test module of the project sees this file)."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


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
