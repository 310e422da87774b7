"""Package layering (DEVELOPERS.md): hnet/ imports nothing from models/ or train/; models/ nothing from
train/. Checked on the source (every import statement, also inside functions)."""

from __future__ import annotations

import ast
import glob
import os

import pytest

from tests.helpers import REPO_ROOT

FORBIDDEN = {"hnet": ("models", "train"), "models": ("train",)}


def imported_packages(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layering(package):
    files = sorted(glob.glob(os.path.join(REPO_ROOT, package, "**", "*.py"), recursive=True))
    assert files
    bad = {}
    for f in files:
        rel = os.path.relpath(f, REPO_ROOT)
        hits = imported_packages(f) & set(FORBIDDEN[package])
        if hits:
            bad[rel] = sorted(hits)
    assert not bad, f"layering violations: {bad}"
