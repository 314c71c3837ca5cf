"""Every package depends only downwards (``schemas ← infra ← {client, worker, settlement} ←
nodecli``), and no production package imports development or test tooling.

Read from the source with ``ast``, lazy imports inside functions included, so an import that
only runs on some code path cannot slip through.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("schemas", "infra", "client", "worker", "settlement", "nodecli")
TOOLING = ("infra.dev", "infra.deploy", "tests", "bench", "docs")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "schemas": ("infra", "client", "worker", "settlement", "nodecli"),
    "infra": ("client", "worker", "settlement", "nodecli"),
    "client": ("worker", "settlement", "nodecli"),
    "worker": ("client", "settlement", "nodecli"),
    "settlement": ("client", "worker", "nodecli"),
    "nodecli": (),
}
"""What each production package must not import (besides the tooling, which none may)."""


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield f"{base}.{node.module}" if node.module else base
            elif node.module:
                yield node.module


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _production_files() -> Iterator[tuple[str, Path]]:
    for package in PRODUCTION:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module(path)
            if any(_within(module, tooling) for tooling in TOOLING):
                continue  # infra.dev and infra.deploy are tooling themselves
            yield package, path


def test_the_rules_cover_every_production_package() -> None:
    assert set(FORBIDDEN) == set(PRODUCTION)
    assert sum(1 for _ in _production_files()) > 100


@pytest.mark.parametrize("package", PRODUCTION)
def test_imports_only_downwards_and_no_tooling(package: str) -> None:
    violations = []
    for owner, path in _production_files():
        if owner != package:
            continue
        for name in _imports(path):
            banned = [*FORBIDDEN[package], *TOOLING]
            if package == "nodecli":
                banned = [t for t in TOOLING if t != "infra.dev"]  # `stack up` starts the dev stack
            if any(_within(name, b) for b in banned):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    # Mutation check of the parser itself: an import hidden inside a function is found.
    probe = ROOT / "schemas" / "canonical.py"
    names = set(_imports(probe))
    assert "rfc8785" in names and "hashlib" in names
    lazy = ROOT / "worker" / "app.py"
    assert "worker.proxy" in set(_imports(lazy))  # imported inside load_engines
