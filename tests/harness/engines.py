"""Test engines for intake scenarios: an echo engine with a latency, a gate and a journal.

``GatedEngine`` answers ML requests by echoing their tensors after ``latency_s``. It records
every request id it started (``calls``) and finished, how many ran at once, and holds requests
back on demand: ``hold(request_id)`` holds one, ``hold_all()`` every request from now on;
``release``/``release_all`` let them go. ``on_start`` runs as each request starts (for
invariant checks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from schemas.requests import ChatInput, MLInput
from schemas.results import MLOutput, Usage
from worker.engines.base import EngineResult, RunContext

__all__ = ["DIGEST", "GatedEngine"]

DIGEST = "cd" * 32


class GatedEngine:
    """An ``Engine`` for ``model``; see the module docstring."""

    def __init__(self, model: str, *, latency_s: float = 0.001) -> None:
        self._model = model
        self._latency_s = latency_s
        self._held: set[str] = set()
        self._hold_all = False
        self._changed = asyncio.Event()
        self.calls: list[str] = []
        self.finished: list[str] = []
        self.running = 0
        self.max_running = 0
        self.on_start: Callable[[str], None] | None = None

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def model_digest(self) -> str:
        return DIGEST

    # -- the gate ---------------------------------------------------------------------------

    def hold(self, *request_ids: str) -> None:
        self._held.update(request_ids)

    def release(self, *request_ids: str) -> None:
        self._held.difference_update(request_ids)
        self._wake()

    def hold_all(self) -> None:
        """Hold every request from now on (until ``release_all``)."""
        self._hold_all = True

    def release_all(self) -> None:
        """Release everything held, and hold nothing more."""
        self._hold_all = False
        self._held.clear()
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _holds(self, request_id: str) -> bool:
        return self._hold_all or request_id in self._held

    # -- Engine ----------------------------------------------------------------------------

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        assert isinstance(payload, MLInput), "GatedEngine answers ML requests"
        request_id = ctx.request_id if ctx is not None else ""
        self.calls.append(request_id)
        if self.on_start is not None:
            self.on_start(request_id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            while self._holds(request_id):
                await self._changed.wait()
            await asyncio.sleep(self._latency_s)
        finally:
            self.running -= 1
        self.finished.append(request_id)
        return EngineResult(MLOutput(tensors=payload.tensors), Usage(input_tokens=4))

    async def close(self) -> None:  # the Engine protocol's close: nothing to free
        return None
