"""Build the model side of a worker from settings: hub → shared cache → engines.

``open_hub`` picks the hub backend (HTTP when ``cache.hub_url`` is set, else the local
directory), ``open_cache`` the shared cache on ``cache_dir``, and ``build_engines`` resolves
every served model in one index read and returns one ``Engine`` per name: pre-warmed models
loaded now (concurrently), the others as ``OnDemandEngine`` placeholders.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from worker.engines.base import Engine
from worker.modelstore.cache import ModelCache
from worker.modelstore.http_hub import HttpHub
from worker.modelstore.hub import ModelHub
from worker.modelstore.loaded import LoadedModels, OnDemandEngine
from worker.modelstore.local_hub import LocalHub
from worker.modelstore.settings import CacheSettings
from worker.modelstore.stats import CacheMetrics

__all__ = ["ModelConfigError", "build_engines", "open_cache", "open_hub"]


class ModelConfigError(ValueError):
    """The model settings name something the hub does not have (a configuration error)."""


def open_hub(hub_dir: Path, cfg: CacheSettings) -> ModelHub:
    if cfg.hub_url is not None:
        return HttpHub(
            cfg.hub_url,
            token=cfg.hub_token,
            timeout_s=cfg.hub_timeout_s,
            attempts=cfg.hub_attempts,
        )
    return LocalHub(hub_dir)


def open_cache(
    hub_dir: Path, cache_dir: Path, cfg: CacheSettings, metrics: CacheMetrics | None = None
) -> ModelCache:
    return ModelCache(
        cache_dir,
        open_hub(hub_dir, cfg),
        budget_bytes=cfg.budget_bytes,
        verify_cached=cfg.verify_cached,
        lock_timeout_s=cfg.lock_timeout_s,
        metrics=metrics,
    )


async def build_engines(
    cache: ModelCache, names: list[str], cfg: CacheSettings
) -> dict[str, Engine]:
    """One engine per served model name (see module doc). On failure nothing stays loaded."""
    index = await asyncio.to_thread(cache.hub.index)
    refs = {}
    for name in names:
        try:
            refs[name] = index.get(name)
        except KeyError:
            raise ModelConfigError(f"model {name} is not in the hub's index") from None
    prewarm = names if cfg.prewarm is None else cfg.prewarm
    if unknown := sorted(set(prewarm) - set(names)):
        raise ModelConfigError(f"prewarm names models this worker does not serve: {unknown}")
    models = LoadedModels(cache, capacity=cfg.engine_lru_size)
    pinned = [name for name in names if name in prewarm]
    loaded = await asyncio.gather(
        *(models.load_pinned(refs[name]) for name in pinned), return_exceptions=True
    )
    failures = [r for r in loaded if isinstance(r, BaseException)]
    engines: dict[str, Engine] = {}
    for name, result in zip(pinned, loaded, strict=True):
        if isinstance(result, BaseException):
            continue
        engines[name] = result
    if failures:
        for engine in engines.values():
            await engine.close()
        raise failures[0]
    for name in names:
        if name not in engines:
            engines[name] = OnDemandEngine(refs[name], models)
    return {name: engines[name] for name in names}
