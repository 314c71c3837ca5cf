"""Loaded models (``worker.modelstore.loaded``) whose hub, served over real loopback HTTP by
``tests.harness.hub_server.HubServer``, is unavailable when a request needs the model. The rest
of the loaded-model tests are in tests/unit/test_modelstore_loaded.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.results import ErrorCode, MLOutput
from tests.harness.hub_server import HubServer
from tests.harness.modelstore import DEMO_MLP_PAYLOAD, demo_hub_with_slow_models
from worker.errors import RetryableError
from worker.modelstore.cache import ModelCache
from worker.modelstore.http_hub import HttpHub
from worker.modelstore.service import build_engines
from worker.modelstore.settings import CacheSettings

PAYLOAD = DEMO_MLP_PAYLOAD


@pytest.fixture
def hub(demo_hub: Path, tmp_path: Path) -> Path:
    return demo_hub_with_slow_models(demo_hub, tmp_path / "hub")


async def test_unavailable_hub_at_request_time_is_a_retryable_error(
    hub: Path, tmp_path: Path
) -> None:
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
