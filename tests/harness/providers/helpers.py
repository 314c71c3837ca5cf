"""Settings and engine helpers for proxy tests: real SDK clients pointed at local servers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import SecretStr

from worker.engines.base import Delta, Emit
from worker.proxy.engine import ProxyEngine
from worker.proxy.loader import load_proxy_engines
from worker.proxy.resilience import RetryRunner
from worker.proxy.settings import (
    BreakerSettings,
    Endpoint,
    Provider,
    ProxiedModel,
    ProxySettings,
    RetrySettings,
)

__all__ = ["FAST_RETRY", "KEYS", "Collector", "engines", "settings_for"]

KEYS = {"a": "sk-test-key-alpha-0001", "b": "sk-test-key-bravo-0002"}
"""Recognisable keys: tests search logs and errors for them."""

FAST_RETRY = RetrySettings(
    max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05, jitter_ratio=0.0
)


def settings_for(
    provider: Provider,
    urls: Sequence[str],
    *,
    api: str = "chat",
    retry: RetrySettings = FAST_RETRY,
    breaker: BreakerSettings | None = None,
    **model: Any,
) -> ProxySettings:
    """One model named ``m`` served through one endpoint per URL, in failover order."""
    endpoints = {
        f"ep-{i}": Endpoint(
            provider=provider, base_url=url, api_key=SecretStr(list(KEYS.values())[i % 2])
        )
        for i, url in enumerate(urls)
    }
    api_model = "gpt-test" if provider is Provider.OPENAI else "claude-test"
    spec = ProxiedModel(
        name="m",
        provider=provider,
        api=api,  # type: ignore[arg-type]
        api_model=model.pop("api_model", api_model),
        endpoints=list(endpoints),
        **model,
    )
    return ProxySettings(
        endpoints=endpoints,
        models=[spec],
        retry=retry,
        breaker=breaker or BreakerSettings(),
    )


@contextlib.asynccontextmanager
async def engines(
    settings: ProxySettings, runner: RetryRunner | None = None
) -> AsyncIterator[dict[str, ProxyEngine[Any]]]:
    loaded = await load_proxy_engines(settings, runner=runner)
    try:
        yield loaded  # type: ignore[misc]
    finally:
        for engine in loaded.values():
            await engine.close()


class Collector:
    """An ``emit`` that keeps every delta."""

    def __init__(self) -> None:
        self.deltas: list[Delta] = []

    @property
    def emit(self) -> Emit:
        async def emit(delta: Delta) -> None:
            self.deltas.append(delta)

        return emit

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    def tool_arguments(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for d in self.deltas:
            for t in d.tool_calls:
                out[t.index] = out.get(t.index, "") + t.arguments
        return out

    def tool_ids(self) -> dict[int, tuple[str | None, str | None]]:
        out: dict[int, tuple[str | None, str | None]] = {}
        for d in self.deltas:
            for t in d.tool_calls:
                old_id, old_name = out.get(t.index, (None, None))
                out[t.index] = (t.id or old_id, t.name or old_name)
        return out
