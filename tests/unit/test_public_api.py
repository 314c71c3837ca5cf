"""``__all__`` is each module's public API, and this test derives what it must hold from the
module itself (as httpx's ``tests/test_exported_members.py`` reads ``vars(httpx)``) instead of
restating the lists.

For every module of the production packages:

- every name in ``__all__`` exists (a package re-exports only names that exist), once;
- every public function or class the module binds and that belongs to it (``__module__`` is the
  module, or for a package ``__init__`` one of its own submodules) is listed. A module without
  ``__all__`` counts as listing nothing, so it may define no public function or class.

Names imported from elsewhere and module constants are not checked: ``vars()`` cannot tell an
imported constant from one defined here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

PACKAGES = ("schemas", "worker", "settlement", "client", "infra", "nodecli")
OURS = frozenset(PACKAGES)
SKIPPED = ("infra.dev", "infra.deploy")
"""Development tooling (local broker, chain, demo stack) and deployment scripts: not API."""

NOT_YET_PRIVATE: dict[str, frozenset[str]] = {}
"""Module internals that lack their leading underscore (none today): named here until they
are renamed; ``test_not_yet_private_is_current`` fails once an entry is no longer needed."""


def _module_names() -> list[str]:
    names: list[str] = []
    for package in PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names.extend(info.name for info in pkgutil.walk_packages(path, f"{package}."))
    return sorted(n for n in names if not n.startswith(SKIPPED))


MODULES = _module_names()


def _import(name: str) -> ModuleType:
    """Import ``name``; skip (not fail) only when a third-party package is missing, such as an
    optional extra (vLLM) that the main virtualenv does not install."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing and missing not in OURS:
            pytest.skip(f"{name} needs {missing}, not installed here")
        raise


def _belongs_to(value: object, module: ModuleType) -> bool:
    owner = getattr(value, "__module__", None)
    if owner == module.__name__:
        return True
    is_package = hasattr(module, "__path__")
    return is_package and isinstance(owner, str) and owner.startswith(f"{module.__name__}.")


def _own_public_names(module: ModuleType) -> set[str]:
    """Public functions and classes that ``module`` binds and that belong to it."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and _belongs_to(value, module)
    }


def test_the_derivation_sees_definitions_not_imports() -> None:
    module = ModuleType("fake.mod")
    source = (
        "from pathlib import Path\nclass Here: ...\ndef helper(): ...\ndef _own(): ...\nN = 1\n"
    )
    exec(source, vars(module))
    assert _own_public_names(module) == {"Here", "helper"}
    package = ModuleType("fake")
    package.__path__ = []
    # Re-exported from its own submodule: must be listed. Imported from elsewhere: not its API.
    vars(package).update(Here=vars(module)["Here"], Path=vars(module)["Path"])
    assert _own_public_names(package) == {"Here"}


def test_the_walk_finds_every_package() -> None:
    assert set(PACKAGES) <= set(MODULES)
    assert "schemas.verify.attestation.nitro" in MODULES
    assert not [m for m in MODULES if m.startswith(SKIPPED)]


@pytest.mark.parametrize("name", MODULES)
def test_every_exported_name_exists_once(name: str) -> None:
    module = _import(name)
    exported = list(getattr(module, "__all__", []))
    assert [n for n in exported if not hasattr(module, n)] == []
    assert sorted(n for n in set(exported) if exported.count(n) > 1) == []


@pytest.mark.parametrize("name", MODULES)
def test_every_public_definition_is_exported(name: str) -> None:
    module = _import(name)
    exported = set(getattr(module, "__all__", []))
    unlisted = _own_public_names(module) - exported - NOT_YET_PRIVATE.get(name, frozenset())
    assert sorted(unlisted) == [], f"add to {name}.__all__, or rename with a leading underscore"


def test_not_yet_private_is_current() -> None:
    for name, names in NOT_YET_PRIVATE.items():
        module = _import(name)
        unlisted = _own_public_names(module) - set(getattr(module, "__all__", []))
        assert sorted(names - unlisted) == [], f"{name}: renamed or exported: drop the entry"
