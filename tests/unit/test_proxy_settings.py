"""Proxy settings: validation, key sources, and the operator's environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from tests.harness.providers.helpers import engines
from worker.proxy.metering import cost_micros
from worker.proxy.settings import Endpoint, ModelPrices, ProxySettings
from worker.settings import WorkerSettings

MODELS: list[dict[str, Any]] = [
    {
        "name": "gpt-4o-mini",
        "provider": "openai",
        "api_model": "gpt-4o-mini",
        "endpoints": ["oa-1", "oa-2"],
        "prices": {"input_micros_per_mtok": 150000, "output_micros_per_mtok": 600000},
        "max_tokens_cap": 2048,
    },
    {
        "name": "claude-sonnet",
        "provider": "anthropic",
        "api_model": "claude-sonnet-5",
        "endpoints": ["an-1"],
    },
]


def test_worker_settings_read_the_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "anthropic.key"
    key_file.write_text("ak-from-file\n")
    endpoints = {
        "oa-1": {"provider": "openai", "api_key_env": "OPENAI_API_KEY"},
        "oa-2": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-2"},
        "an-1": {"provider": "anthropic", "api_key_file": str(key_file)},
    }
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("OG_WORKER_PROXY__ENDPOINTS", json.dumps(endpoints))
    monkeypatch.setenv("OG_WORKER_PROXY__MODELS", json.dumps(MODELS))
    monkeypatch.setenv("OG_WORKER_PROXY__RETRY__MAX_ATTEMPTS", "4")
    proxy = WorkerSettings().proxy
    assert [m.name for m in proxy.models] == ["gpt-4o-mini", "claude-sonnet"]
    assert proxy.retry.max_attempts == 4
    assert proxy.endpoints["oa-1"].read_key().get_secret_value() == "sk-from-env"
    assert proxy.endpoints["an-1"].read_key().get_secret_value() == "ak-from-file"
    assert "sk-2" not in repr(proxy) and "sk-2" not in str(proxy.model_dump())


def test_the_default_has_no_proxied_models() -> None:
    assert ProxySettings().models == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": [{**MODELS[0], "endpoints": ["missing"]}]}, "unknown endpoint"),
        ({"models": [{**MODELS[0], "endpoints": ["an-1"]}]}, "is anthropic"),
        ({"models": [{**MODELS[1], "api": "completions"}]}, "only for provider openai"),
        ({"models": [MODELS[1], MODELS[1]]}, "unique"),
    ],
)
def test_invalid_registries_are_refused(change: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "endpoints": {
            "oa-1": {"provider": "openai", "api_key": "k"},
            "oa-2": {"provider": "openai", "api_key": "k"},
            "an-1": {"provider": "anthropic", "api_key": "k"},
        },
        "models": MODELS,
    }
    with pytest.raises(ValidationError, match=message):
        ProxySettings.model_validate(base | change)


def test_an_endpoint_needs_exactly_one_key_source(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        Endpoint(provider="openai")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="exactly one"):
        Endpoint(provider="openai", api_key=SecretStr("a"), api_key_env="X")  # type: ignore[arg-type]
    missing = Endpoint(provider="openai", api_key_file=tmp_path / "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot read api_key_file"):
        missing.read_key()


async def test_a_missing_key_fails_start_up_naming_the_source_not_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OG_TEST_NO_SUCH_KEY", raising=False)
    settings = ProxySettings.model_validate(
        {
            "endpoints": {"e": {"provider": "openai", "api_key_env": "OG_TEST_NO_SUCH_KEY"}},
            "models": [{"name": "m", "provider": "openai", "api_model": "x", "endpoints": ["e"]}],
        }
    )
    with pytest.raises(ValueError, match="proxy endpoint e: environment variable OG_TEST_NO_SUCH"):
        async with engines(settings):
            pass


def test_cost_is_integer_and_rounds_up() -> None:
    prices = ModelPrices(input_micros_per_mtok=150_000, output_micros_per_mtok=600_000)
    assert cost_micros(1_000_000, 0, prices) == 150_000
    assert cost_micros(1, 0, prices) == 1  # 0.15 micro-units: rounded up, never lost
    assert cost_micros(0, 0, prices) == 0
    assert isinstance(cost_micros(3, 5, prices), int)
