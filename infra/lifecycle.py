"""Lifecycle helpers shared by the long-running services: signals and ready files.

The first SIGTERM/SIGINT asks the service to stop gracefully (drain, commit, leave the group);
a second one exits at once, for an operator who does not want to wait.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

__all__ = ["clear_ready", "install_stop_handlers", "mark_ready"]

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
