"""The test tree's own rules: test files are leaves (shared helpers live in ``tests/harness``,
never in another test file), unit test files are named ``test_<module>.py``, and the unit tier's
guard (tests/unit/conftest.py, ``tests.harness.io_guard``) really refuses network sockets and
processes, in fixtures of every scope as well as in tests."""

from __future__ import annotations

import ast
import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.io_guard import IOForbidden

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
TIERS = ("unit", "integration", "e2e", "contract")
"""The tiers' packages under tests/: nothing imports from them (``tests.harness`` is for that)."""
UNIT_FILE = re.compile(r"test_[a-z0-9]+(_[a-z0-9]+)*\.py")


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).parent.parts)


def _imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, a file of ``package``;
    relative imports are resolved against ``package``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                if not module:  # from . import x: x may be a module
                    found.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
                    continue
                module = f"{base}.{module}"
            found.append((node.lineno, module))
    return found


def _imports_a_test_file(module: str) -> bool:
    return any(module == f"tests.{tier}" or module.startswith(f"tests.{tier}.") for tier in TIERS)


def test_no_test_imports_another_test_file() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line}: imports {module}"
        for path in _python_files()
        for line, module in _imported_modules(path.read_text(encoding="utf-8"), _package_of(path))
        if _imports_a_test_file(module)
    ]
    assert offenders == [], "move shared helpers into tests/harness:\n" + "\n".join(offenders)


def test_unit_test_files_are_named_test_module() -> None:
    misnamed = [
        path.name
        for path in (TESTS / "unit").iterdir()
        if path.suffix == ".py"
        and path.name not in {"__init__.py", "conftest.py"}
        and not UNIT_FILE.fullmatch(path.name)
    ]
    assert misnamed == []
    assert not [p for p in (TESTS / "unit").iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_the_import_check_sees_relative_and_absolute_imports() -> None:
    source = (
        "from .test_pipeline import X\n"
        "from . import test_signing\n"
        "from ..harness import pipeline\n"
        "import tests.integration.test_zkml\n"
        "def f():\n"
        "    from tests.e2e import test_cli_stack\n"
    )
    modules = [m for _, m in _imported_modules(source, "tests.unit")]
    assert modules == [
        "tests.unit.test_pipeline",
        "tests.unit.test_signing",
        "tests.harness",
        "tests.integration.test_zkml",
        "tests.e2e",
    ]
    assert [_imports_a_test_file(m) for m in modules] == [True, True, False, True, True]
    assert not _imports_a_test_file("tests.harness.pipeline")
    assert not _imports_a_test_file("tests.unitary")


# --- the unit tier's guard ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_refused_in_a_module_fixture() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except IOForbidden:
        return True
    return False


def test_the_guard_covers_fixtures_of_wider_scope(socket_refused_in_a_module_fixture: bool) -> None:
    assert socket_refused_in_a_module_fixture


@pytest.mark.parametrize(
    "family", [None, socket.AF_INET, socket.AF_INET6], ids=["default", "inet", "inet6"]
)
def test_network_sockets_are_refused(family: int | None) -> None:
    with pytest.raises(IOForbidden, match="network sockets"):
        socket.socket() if family is None else socket.socket(family, socket.SOCK_STREAM)


def test_connections_and_name_resolution_are_refused() -> None:
    with pytest.raises(IOForbidden):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(IOForbidden):
        socket.getaddrinfo("localhost", 80)


def test_processes_are_refused() -> None:
    with pytest.raises(IOForbidden, match="start processes"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)


async def test_asyncio_subprocesses_are_refused() -> None:
    with pytest.raises(IOForbidden, match="start processes"):
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")


def test_multiprocessing_is_refused() -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with pytest.raises(IOForbidden):
        context.Process(target=print).start()


async def test_unix_socket_pairs_stay_allowed() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        assert right.recv(1) == b"x"
    await asyncio.sleep(0)  # the event loop's own self-pipe is a unix socket pair
