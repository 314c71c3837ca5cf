"""Loaded models (``worker.modelstore.loaded``, built by ``worker.modelstore.service``): pre-warmed
engines, the on-demand engine LRU, and their leases. A hub that fails at request time is tested
in tests/integration/test_modelstore_loaded.py (it serves the hub over HTTP)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from schemas.results import MLOutput
from tests.harness.modelstore import DEMO_MLP_PAYLOAD, demo_hub_with_slow_models
from worker.engines.fixed import FixedLatencyEngine
from worker.engines.onnx import OnnxEngine
from worker.modelstore.cache import ModelCache
from worker.modelstore.loaded import OnDemandEngine
from worker.modelstore.service import ModelConfigError, build_engines, open_cache
from worker.modelstore.settings import CacheSettings
from worker.modelstore.stats import CacheEvent

PAYLOAD = DEMO_MLP_PAYLOAD


@pytest.fixture
def hub(demo_hub: Path, tmp_path: Path) -> Path:
    return demo_hub_with_slow_models(demo_hub, tmp_path / "hub")


def _events(cache: ModelCache) -> list[str]:
    seen: list[str] = []

    def record(event: CacheEvent) -> None:
        if event.kind != "usage":  # the volume's size, covered in test_modelstore_cache
            seen.append(f"{event.kind}:{event.model}")

    cache.metrics.add_listener(record)
    return seen


async def test_prewarmed_are_loaded_others_wait_for_their_first_request(
    hub: Path, tmp_path: Path
) -> None:
    cfg = CacheSettings(prewarm=["demo-mlp"], engine_lru_size=1)
    cache = open_cache(hub, tmp_path / "cache", cfg)
    events = _events(cache)
    engines = await build_engines(cache, ["demo-mlp", "slow-a", "slow-b"], cfg)
    assert isinstance(engines["demo-mlp"], OnnxEngine)
    assert isinstance(engines["slow-a"], OnDemandEngine)
    assert engines["slow-a"].model_digest == cache.hub.resolve("slow-a").digest
    assert events == ["miss:demo-mlp", "load:demo-mlp"]
    assert {e.model for e in cache.entries()} == {"demo-mlp"}  # nothing else fetched yet

    result = await engines["slow-a"].run(PAYLOAD)
    assert isinstance(result.output, MLOutput)
    await engines["slow-b"].run(PAYLOAD)  # LRU of one: slow-a is closed, its lease released
    assert events[2:] == [
        "miss:slow-a",
        "load:slow-a",
        "miss:slow-b",
        "load:slow-b",
        "unload:slow-a",
    ]
    in_use = {e.model: e.in_use for e in cache.entries()}
    assert in_use == {"demo-mlp": True, "slow-a": False, "slow-b": True}

    for engine in engines.values():
        await engine.close()
    assert not any(e.in_use for e in cache.entries())


async def test_a_running_engine_is_not_unloaded(hub: Path, tmp_path: Path) -> None:
    cfg = CacheSettings(prewarm=[], engine_lru_size=1)
    cache = open_cache(hub, tmp_path / "cache", cfg)
    events = _events(cache)
    engines = await build_engines(cache, ["slow-a", "slow-b"], cfg)
    results = await asyncio.gather(*(engines[m].run(PAYLOAD) for m in ("slow-a", "slow-b")))
    assert len(results) == 2
    # Both ran at once (over capacity while busy); one was unloaded only when it finished.
    assert events.count("unload:slow-a") + events.count("unload:slow-b") == 1
    for engine in engines.values():
        await engine.close()


async def test_default_prewarm_loads_every_model(hub: Path, tmp_path: Path) -> None:
    cfg = CacheSettings()
    cache = open_cache(hub, tmp_path / "cache", cfg)
    engines = await build_engines(cache, ["slow-a", "demo-mlp"], cfg)
    assert list(engines) == ["slow-a", "demo-mlp"]
    assert isinstance(engines["slow-a"], FixedLatencyEngine)
    for engine in engines.values():
        await engine.close()


async def test_configuration_errors_name_the_model(hub: Path, tmp_path: Path) -> None:
    cache = open_cache(hub, tmp_path / "cache", CacheSettings())
    with pytest.raises(ModelConfigError, match="no-such-model"):
        await build_engines(cache, ["demo-mlp", "no-such-model"], CacheSettings())
    with pytest.raises(ModelConfigError, match="slow-a"):
        await build_engines(cache, ["demo-mlp"], CacheSettings(prewarm=["slow-a"]))


async def test_a_failed_prewarm_leaves_nothing_loaded(hub: Path, tmp_path: Path) -> None:
    bad = json.loads((hub / "index.json").read_text())
    for model in bad["models"]:
        if model["name"] == "slow-b":
            (hub / model["uri"]).write_text('{"latency_ms": 1}')  # no longer its digest
    cache = open_cache(hub, tmp_path / "cache", CacheSettings())
    with pytest.raises(Exception, match="does not match"):
        await build_engines(cache, ["slow-a", "slow-b"], CacheSettings())
    assert not any(e.in_use for e in cache.entries())
