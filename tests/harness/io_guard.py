"""The unit tier's guard: while it is on, opening a network socket or starting a process
raises ``IOForbidden`` (tests/unit/conftest.py turns it on around every unit test).

What counts as opening a socket: creating an ``AF_INET``/``AF_INET6`` socket, including
``socket.socket()`` with no arguments (which defaults to ``AF_INET``), from any reference to
the class (``from socket import socket`` included), and name resolution (``getaddrinfo``).
Unix-domain socket pairs stay allowed: asyncio's event loop wakes itself through one. Wrapping
an already open descriptor (``fileno=``) is not opening one. What counts as starting a
process: ``subprocess``, asyncio's subprocess helpers, ``multiprocessing`` (through
``_posixsubprocess.fork_exec`` and ``os.fork``), ``os.posix_spawn*``, ``os.system``.
"""

from __future__ import annotations

import _posixsubprocess
import asyncio
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

__all__ = ["IOForbidden", "no_sockets_or_processes"]


class IOForbidden(AssertionError):
    """A unit test tried to open a network socket or start a process."""


def _forbid(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise IOForbidden(f"unit tests do not {what}: move this test to tests/integration")

    return refuse


_REAL_SOCKET_INIT = socket.socket.__init__
_NETWORK_FAMILIES = (-1, socket.AF_INET, socket.AF_INET6)  # -1: the default, AF_INET


def _guarded_socket_init(
    self: socket.socket,
    family: int = -1,
    type: int = -1,
    proto: int = -1,
    fileno: int | None = None,
) -> None:
    if fileno is None and family in _NETWORK_FAMILIES:
        raise IOForbidden(
            "unit tests do not open network sockets: move this test to tests/integration"
        )
    _REAL_SOCKET_INIT(self, family, type, proto, fileno)


@contextmanager
def no_sockets_or_processes() -> Iterator[None]:
    """Refuse network sockets and processes until the block ends."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "__init__", _guarded_socket_init)
        mp.setattr(socket, "create_connection", _forbid("open network connections"))
        mp.setattr(socket, "getaddrinfo", _forbid("resolve host names"))
        mp.setattr(subprocess.Popen, "__init__", _forbid("start processes"))
        mp.setattr(subprocess, "_fork_exec", _forbid("start processes"))
        mp.setattr(_posixsubprocess, "fork_exec", _forbid("start processes"))
        mp.setattr(asyncio, "create_subprocess_exec", _forbid("start processes"))
        mp.setattr(asyncio, "create_subprocess_shell", _forbid("start processes"))
        mp.setattr(os, "fork", _forbid("fork"))
        mp.setattr(os, "forkpty", _forbid("fork"))
        mp.setattr(os, "posix_spawn", _forbid("start processes"))
        mp.setattr(os, "posix_spawnp", _forbid("start processes"))
        mp.setattr(os, "system", _forbid("start processes"))
        yield
