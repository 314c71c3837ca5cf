"""A thread pool of one engine, so engines never wait for one another.

Synchronous runtimes (ONNX Runtime, torch) run off the event loop; on asyncio's shared default
executor a queue of slow LLM generations delayed every ONNX request behind them (a demo-mlp
request waited 3 s behind twelve demo-lm generations). Each engine therefore owns a pool sized
for it: the CPU LLM one thread (it generates one request at a time anyway), ONNX a few (its
calls take microseconds to milliseconds). A pool shuts down when its engine closes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["EngineThreads"]

P = ParamSpec("P")
T = TypeVar("T")


class EngineThreads:
    def __init__(self, name: str, max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=f"engine-{name}"
        )
        self.max_workers = max_workers

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on this engine's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Stop taking work; a call still running finishes on its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)
