"""Building the proxy engines from ``ProxySettings`` (called by the worker's composition root).

One SDK client, one circuit breaker and one Retry-After pause per endpoint, shared by every
model that uses the endpoint. Keys are read here, off the event loop; a missing key fails
start-up with a message naming its source, never its value.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from worker.engines.base import Engine
from worker.proxy.engine import ProxyEngine, SharedClient
from worker.proxy.resilience import CircuitBreaker, EndpointSlot, ProviderObserver, RetryRunner
from worker.proxy.settings import Endpoint, Provider, ProxiedModel, ProxySettings

__all__ = ["load_proxy_engines", "quiet_sdk_loggers"]

log = logging.getLogger(__name__)

_SDK_LOGGERS = ("openai", "anthropic", "httpx", "httpx2", "httpcore", "httpcore2")


def quiet_sdk_loggers() -> None:
    """At DEBUG the SDKs log whole request options (prompts included) and URLs: keep their
    loggers at WARNING or above whatever the root level is."""
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def _new_client(endpoint: Endpoint, key: Any) -> SharedClient[Any]:
    if endpoint.provider is Provider.OPENAI:
        from worker.proxy.openai_engine import new_openai_client

        openai_client = new_openai_client(endpoint.url, key)
        return SharedClient(openai_client, openai_client.close)
    from worker.proxy.anthropic_engine import new_anthropic_client

    anthropic_client = new_anthropic_client(endpoint.url, key)
    return SharedClient(anthropic_client, anthropic_client.close)


def _engine(
    model: ProxiedModel,
    slots: list[EndpointSlot[Any]],
    shared: list[SharedClient[Any]],
    runner: RetryRunner,
) -> ProxyEngine[Any]:
    if model.provider is Provider.ANTHROPIC:
        from worker.proxy.anthropic_engine import AnthropicEngine

        return AnthropicEngine(model, slots, shared, runner)
    from worker.proxy.openai_engine import OpenAIChatEngine, OpenAICompletionsEngine

    if model.api == "completions":
        return OpenAICompletionsEngine(model, slots, shared, runner)
    return OpenAIChatEngine(model, slots, shared, runner)


async def load_proxy_engines(
    settings: ProxySettings,
    *,
    runner: RetryRunner | None = None,
    metrics: ProviderObserver | None = None,
) -> dict[str, Engine]:
    """One engine per proxied model, keyed by its name. ``runner`` is for tests (clocks);
    ``metrics`` receives every provider call, error and retry."""
    if not settings.models:
        return {}
    quiet_sdk_loggers()
    runner = runner or RetryRunner(settings.retry, observer=metrics)
    used = {name for model in settings.models for name in model.endpoints}
    clients: dict[str, SharedClient[Any]] = {}
    slots: dict[str, EndpointSlot[Any]] = {}
    try:
        for name in sorted(used):
            endpoint = settings.endpoints[name]
            try:
                key = await asyncio.to_thread(endpoint.read_key)
            except ValueError as e:
                raise ValueError(f"proxy endpoint {name}: {e}") from None
            clients[name] = _new_client(endpoint, key)
            breaker = CircuitBreaker(settings.breaker, name=name)
            slots[name] = EndpointSlot(
                name, clients[name].client, breaker, provider=endpoint.provider.value
            )
    except BaseException:
        for client in clients.values():
            client.hold()
            await client.release()
        raise
    engines: dict[str, Engine] = {}
    for model in settings.models:
        engine = _engine(
            model,
            [slots[n] for n in model.endpoints],
            [clients[n] for n in model.endpoints],
            runner,
        )
        engines[model.name] = engine
        log.info(
            "proxied model ready",
            extra={
                "model": model.name,
                "provider": model.provider.value,
                "digest": engine.model_digest,
                "endpoints": model.endpoints,
            },
        )
    return engines
