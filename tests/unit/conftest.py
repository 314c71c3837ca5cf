"""The unit tier really has no I/O beyond temporary files: a guard fails any unit test that
opens a network socket or starts a process (those belong in ``tests/integration``); what it
refuses is listed in ``tests.harness.io_guard``.

The guard is on while each unit test is set up, runs and is torn down, so fixtures of every
scope are covered: a module-scoped fixture that starts a process is set up during the first
test that asks for it, and fails there. (An autouse function-scoped fixture would be set up
after the wider-scoped fixtures and miss them.) The one phase left unguarded is the teardown
after the session's last test, where fixtures of other tiers (the broker) are finalised.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.harness.io_guard import no_sockets_or_processes


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with no_sockets_or_processes():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with no_sockets_or_processes():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    if nextitem is None:  # the session's fixtures, other tiers' included, are finalised here
        return (yield)
    with no_sockets_or_processes():
        return (yield)
