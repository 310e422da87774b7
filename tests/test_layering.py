"""Package layering (DEVELOPERS.md): hnet/ imports nothing from models/ or train/; models/ nothing from
train/; a model family module (models/<family>.py) imports no other family module, only models.base and
models.common. Checked on the source (every import statement, also inside functions)."""

from __future__ import annotations

import ast
import glob
import os

import pytest

from tests.helpers import REPO_ROOT

FORBIDDEN = {"hnet": ("models", "train"), "models": ("train",)}


def imported_modules(path: str) -> set[str]:
    """Dotted names of every absolute import of ``path`` (``from a.b import c`` gives a.b and a.b.c)."""
    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def imported_packages(path: str) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)}


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



def test_model_families_do_not_import_each_other():
    """From models/, a module imports only models.base and models.common (the shared parts)."""
    bad = {}
    for f in sorted(glob.glob(os.path.join(REPO_ROOT, "models", "*.py"))):
        hits = {m for m in imported_modules(f) if m.startswith("models.") and m.split(".")[1] not in ("base", "common")}
        if hits:
            bad[os.path.relpath(f, REPO_ROOT)] = sorted(hits)
    assert not bad, f"model modules importing another model module: {bad}"
