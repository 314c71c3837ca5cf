"""Models in memory: pinned engines loaded at start, and an LRU of on-demand ones.

The disk cache (``ModelCache``) decides what is on the shared volume; this module decides what
is loaded in this process. Every loaded engine holds the cache's in-use lease on its files
(handed to the engine as ``on_close``), so no process can evict a model another has loaded.

* ``load_pinned`` materialises and loads a model for the worker's lifetime (the pre-warm list;
  by default every served model, which is how a worker always behaved).
* ``OnDemandEngine`` stands in for a model that is not pre-warmed: it implements ``Engine``
  from the model's reference alone (name, digest) and loads the real engine on the first
  request. At most ``capacity`` on-demand engines stay loaded; the least recently used one
  that is not running a request is closed to make room (its lease released, so the disk cache
  may evict it later).

Loading never blocks the event loop: materialising (locks, download, hashing) runs in a
thread, and engines load themselves in threads. A model that cannot be loaded at request time
answers ``internal`` (retryable): another node, or a later try, may have it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from schemas.requests import ChatInput, MLInput
from schemas.results import ErrorCode
from worker.engines import load_engine
from worker.engines.base import Engine, EngineResult, RunContext
from worker.errors import RetryableError
from worker.modelstore.cache import ModelCache
from worker.modelstore.hub import ModelError
from worker.modelstore.refs import ModelRef
from worker.modelstore.stats import CacheEvent

__all__ = ["LoadedModels", "OnDemandEngine"]

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    engine: Engine
    busy: int = 0


class LoadedModels:
    """Loads engines from ``cache``; keeps at most ``capacity`` on-demand ones."""

    def __init__(self, cache: ModelCache, *, capacity: int) -> None:
        self.cache = cache
        self.capacity = capacity
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}

    @property
    def loaded(self) -> list[str]:
        """Names of the on-demand models loaded now, least recently used first."""
        return [name for name, _ in self._slots]

    async def load_pinned(self, ref: ModelRef) -> Engine:
        """Materialise and load ``ref``; the caller owns the engine (and closes it)."""
        started = time.perf_counter()
        cached = await asyncio.to_thread(self.cache.materialize, ref)
        try:
            engine = await load_engine(ref, cached.path, on_close=cached.release)
        except BaseException:
            cached.release()
            raise
        seconds = time.perf_counter() - started
        self.cache.metrics.record(CacheEvent("load", ref.name, ref.digest, seconds=seconds))
        log.info(
            "model loaded",
            extra={"model": ref.name, "digest": ref.digest, "seconds": round(seconds, 3)},
        )
        return engine

    async def run(
        self, ref: ModelRef, payload: ChatInput | MLInput, ctx: RunContext | None
    ) -> EngineResult:
        slot = await self._checkout(ref)
        try:
            return await slot.engine.run(payload, ctx)
        finally:
            slot.busy -= 1
            await self._shrink()

    async def unload(self, ref: ModelRef) -> None:
        """Close ``ref``'s on-demand engine if it is loaded (worker shutdown)."""
        slot = self._slots.pop((ref.name, ref.digest), None)
        if slot is not None:
            await self._close(ref.name, ref.digest, slot)

    async def _checkout(self, ref: ModelRef) -> _Slot:
        key = (ref.name, ref.digest)
        slot = self._slots.get(key)
        if slot is None:
            lock = self._loading.setdefault(key, asyncio.Lock())
            async with lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = _Slot(await self._load_on_demand(ref))
                    self._slots[key] = slot
        self._slots.move_to_end(key)
        slot.busy += 1
        await self._shrink()
        return slot

    async def _load_on_demand(self, ref: ModelRef) -> Engine:
        try:
            return await self.load_pinned(ref)
        except ModelError as e:
            # Hub down, cache full of models in use, damaged artifact: this node cannot serve
            # the model now; the message names the cause, never request data.
            raise RetryableError(
                f"model {ref.name} is not available on this node now ({type(e).__name__})",
                code=ErrorCode.INTERNAL,
                model=ref.name,
            ) from e

    async def _shrink(self) -> None:
        while len(self._slots) > self.capacity:
            victim = next(((k, s) for k, s in self._slots.items() if s.busy == 0), None)
            if victim is None:
                return  # every loaded model is running a request: over capacity until one ends
            key, slot = victim
            del self._slots[key]
            await self._close(*key, slot)

    async def _close(self, name: str, digest: str, slot: _Slot) -> None:
        await slot.engine.close()
        self.cache.metrics.record(CacheEvent("unload", name, digest))


class OnDemandEngine:
    """An ``Engine`` for a model that loads on its first request (see module doc)."""

    def __init__(self, ref: ModelRef, models: LoadedModels) -> None:
        self._ref = ref
        self._models = models

    @property
    def model_name(self) -> str:
        return self._ref.name

    @property
    def model_digest(self) -> str:
        return self._ref.digest

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        return await self._models.run(self._ref, payload, ctx)

    async def close(self) -> None:
        await self._models.unload(self._ref)
