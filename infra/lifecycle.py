"""Lifecycle helpers shared by the long-running services: signals, ready files and the
supervision of background tasks.

The first SIGTERM/SIGINT asks the service to stop gracefully (drain, commit, leave the group);
a second one exits at once, for an operator who does not want to wait.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

__all__ = ["Supervisor", "clear_ready", "install_stop_handlers", "mark_ready"]

log = logging.getLogger(__name__)

EXIT_ON_SECOND_SIGNAL = 130


def install_stop_handlers(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    received = 0

    def on_signal() -> None:
        nonlocal received
        received += 1
        if received > 1:
            os._exit(EXIT_ON_SECOND_SIGNAL)
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)


async def mark_ready(path: Path | None, text: str = "ready") -> None:
    """Write the ready file that ``stack up`` (or an exec probe) waits for."""
    if path is not None:
        await asyncio.to_thread(_write, path, text)


async def clear_ready(path: Path | None) -> None:
    if path is not None:
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


class Supervisor:
    """The background tasks of one service, none of which may die silently.

    A task that ends while the service runs (an exception, or a return it should never make)
    is recorded in ``failures``, turns ``healthy`` false (readiness fails) and calls
    ``on_failure`` once, which stops the service cleanly: an orchestrator restarts it. ``stop``
    cancels every task and waits for them, bounded by ``timeout_s``.
    """

    def __init__(self, on_failure: Callable[[str], None] | None = None) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._on_failure = on_failure
        self._stopping = False
        self.failures: dict[str, str] = {}

    @property
    def healthy(self) -> bool:
        return not self.failures

    def shutting_down(self) -> None:
        """From now on tasks may end (the service is stopping them): not a failure."""
        self._stopping = True

    def spawn(
        self, name: str, coro: Coroutine[Any, Any, None], *, may_return: bool = False
    ) -> asyncio.Task[None]:
        """Run ``coro`` as task ``name``. ``may_return``: it ends by itself when its owner
        tells it to (a heartbeat loop after ``stop``), so only an exception is a failure."""
        if name in self._tasks and not self._tasks[name].done():
            raise ValueError(f"task {name} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(functools.partial(self._ended, name, may_return))
        return task

    def _ended(self, name: str, may_return: bool, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        if error is None and may_return:
            return
        self.failures[name] = type(error).__name__ if error is not None else "returned"
        log.critical(
            "background task died", extra={"task": name, "error_type": self.failures[name]}
        )
        if self._on_failure is not None:
            self._on_failure(name)

    async def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # ``asyncio.wait`` never raises the tasks' exceptions and never swallows our own
            # cancellation (unlike ``wait_for`` on 3.11).
            await asyncio.wait(tasks, timeout=timeout_s)
