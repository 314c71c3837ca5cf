"""Loaded models: pre-warmed engines, the on-demand engine LRU, and their leases."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from schemas.requests import MLInput
from schemas.results import ErrorCode, MLOutput
from worker.engines.fixed import FixedLatencyEngine
from worker.engines.onnx import OnnxEngine
from worker.errors import RetryableError
from worker.models.cache import ModelCache
from worker.models.demo import add_fixed_latency_model
from worker.models.http_hub import HttpHub
from worker.models.loaded import OnDemandEngine
from worker.models.service import ModelConfigError, build_engines, open_cache
from worker.models.settings import CacheSettings
from worker.models.stats import CacheEvent

PAYLOAD = MLInput.model_validate(
    {"tensors": {"x": {"dtype": "float32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}}}
)


@pytest.fixture
def hub(demo_hub: Path, tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    shutil.copytree(demo_hub, root)  # a copy: these tests add and damage models
    add_fixed_latency_model(root, "slow-a", 50)
    add_fixed_latency_model(root, "slow-b", 51)  # a different blob, so a different digest
    return root


def _events(cache: ModelCache) -> list[str]:
    seen: list[str] = []

    def record(event: CacheEvent) -> None:
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


async def test_unavailable_hub_at_request_time_is_a_retryable_error(
    hub: Path, tmp_path: Path
) -> None:
    from tests.unit.test_cache_http import HubServer

    cfg = CacheSettings(prewarm=[])
    with HubServer(hub) as server:
        cache = ModelCache(tmp_path / "cache", HttpHub(server.url, attempts=2, backoff_s=0.01))
        engines = await build_engines(cache, ["slow-a"], cfg)
        server.status["blobs/slow-a-1.json"] = [503, 503]
        with pytest.raises(RetryableError) as info:
            await engines["slow-a"].run(PAYLOAD)
        assert info.value.code is ErrorCode.INTERNAL
        assert "not available on this node" in info.value.message
        assert isinstance((await engines["slow-a"].run(PAYLOAD)).output, MLOutput)  # hub back
        await engines["slow-a"].close()
