"""A fixed-latency engine: waits exactly ``latency_ms`` then echoes its ML input tensors.

It exists so benchmarks and intake tests can measure the worker itself: with a known engine
cost, throughput against window size shows how much concurrency intake really delivers.
The wait is an ``asyncio.sleep``, i.e. it models an engine that runs off the event loop (a GPU
engine or a remote provider), never blocking it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from schemas.requests import ChatInput, MLInput
from schemas.results import ErrorCode, MLOutput
from worker.engines.base import EngineResult, RunContext
from worker.errors import PermanentError
from worker.modelstore.refs import ModelRef

__all__ = ["FixedLatencyEngine"]


class FixedLatencyEngine:
    def __init__(
        self, ref: ModelRef, latency_s: float, *, on_close: Callable[[], None] | None = None
    ) -> None:
        self._ref = ref
        self._latency_s = latency_s
        self._on_close = on_close
        self.running = 0
        self.max_running = 0

    @classmethod
    async def load(
        cls, ref: ModelRef, path: Path, *, on_close: Callable[[], None] | None = None
    ) -> FixedLatencyEngine:
        spec = json.loads(await asyncio.to_thread(path.read_bytes))
        return cls(ref, float(spec["latency_ms"]) / 1000, on_close=on_close)

    @property
    def model_name(self) -> str:
        return self._ref.name

    @property
    def model_digest(self) -> str:
        return self._ref.digest

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        if not isinstance(payload, MLInput):
            raise PermanentError(
                f"model {self._ref.name} takes ml tensors", code=ErrorCode.BAD_REQUEST
            )
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self._latency_s)
        finally:
            self.running -= 1
        return EngineResult(MLOutput(tensors=payload.tensors))

    async def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
