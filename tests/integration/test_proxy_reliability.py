"""Retries, Retry-After, failover, circuit breakers, timeouts and privacy, with the real SDKs
talking to local provider servers."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from schemas.requests import ChatInput, ChatMessage
from schemas.results import ChatOutput, ErrorCode
from tests.harness.providers import anthropic_wire as awire
from tests.harness.providers import openai_wire as owire
from tests.harness.providers.helpers import KEYS, Collector, engines, settings_for
from tests.harness.providers.server import ProviderServer, slow
from worker.engines.base import RunContext
from worker.proxy.errors import ProxyError
from worker.proxy.metering import UsageRecord
from worker.proxy.settings import BreakerSettings, ModelPrices, Provider, RetrySettings

PROMPT = "my-private-prompt-text about Ada"


def _chat() -> ChatInput:
    return ChatInput(messages=[ChatMessage(role="user", content=PROMPT)])


async def test_openai_retry_waits_for_retry_after_seconds() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(owire.error(429, headers={"retry-after": "1"}), owire.chat_completion("ok"))
        result = await loaded["m"].run(_chat())
    assert isinstance(result.output, ChatOutput) and result.output.text == "ok"
    first, second = server.requests
    waited_s = second.at_s - first.at_s
    assert 1.0 <= waited_s < 1.5, waited_s  # backoff alone would be 0.01 s


async def test_anthropic_retry_waits_for_retry_after_ms() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(
            awire.error(429, kind="rate_limit_error", headers={"retry-after-ms": "400"}),
            awire.message(),
        )
        await loaded["m"].run(_chat())
    first, second = server.requests
    assert 0.4 <= second.at_s - first.at_s < 0.9


async def test_retry_after_beyond_the_cap_answers_rate_limited_at_once() -> None:
    retry = RetrySettings(max_attempts=3, backoff_initial_s=0.01, max_retry_after_s=5)
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url], retry=retry)) as loaded,
    ):
        server.enqueue(owire.error(429, headers={"retry-after": "120"}))
        started = time.monotonic()
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat())
    assert caught.value.code is ErrorCode.RATE_LIMITED and caught.value.retryable
    assert time.monotonic() - started < 1.0
    assert len(server.requests) == 1


async def test_rate_limited_key_fails_over_to_the_second_key_without_waiting() -> None:
    async with ProviderServer() as first, ProviderServer() as second:
        settings = settings_for(Provider.OPENAI, [first.url, second.url])
        async with engines(settings) as loaded:
            first.enqueue(owire.error(429, headers={"retry-after": "30"}))
            second.enqueue(owire.chat_completion("from b"))
            started = time.monotonic()
            result = await loaded["m"].run(_chat())
            elapsed_s = time.monotonic() - started
    assert isinstance(result.output, ChatOutput) and result.output.text == "from b"
    assert elapsed_s < 1.0
    assert first.requests[0].headers["authorization"] == f"Bearer {KEYS['a']}"
    assert second.requests[0].headers["authorization"] == f"Bearer {KEYS['b']}"


async def test_refused_key_fails_over_and_is_not_retried_in_that_request() -> None:
    async with ProviderServer() as first, ProviderServer() as second:
        settings = settings_for(Provider.ANTHROPIC, [first.url, second.url])
        async with engines(settings) as loaded:
            first.enqueue(awire.error(401, kind="authentication_error"))
            second.enqueue(awire.error(500), awire.message())
            await loaded["m"].run(_chat())
    assert len(first.requests) == 1  # 401: that endpoint cannot serve; retries go to b
    assert len(second.requests) == 2


async def test_server_error_answers_provider_error_after_all_attempts() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(*[owire.error(500) for _ in range(3)])
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat())
    assert caught.value.code is ErrorCode.PROVIDER_ERROR and caught.value.retryable
    assert len(server.requests) == 3
    gaps = [b.at_s - a.at_s for a, b in zip(server.requests, server.requests[1:], strict=False)]
    assert gaps[1] >= gaps[0] * 1.5  # exponential backoff: 0.01 s then 0.02 s


async def test_circuit_opens_after_consecutive_failures_then_probes_after_cooldown() -> None:
    breaker = BreakerSettings(failure_threshold=2, cooldown_s=0.5)
    retry = RetrySettings(max_attempts=1)
    async with (
        ProviderServer() as server,
        engines(
            settings_for(Provider.OPENAI, [server.url], retry=retry, breaker=breaker)
        ) as loaded,
    ):
        engine = loaded["m"]
        server.enqueue(owire.error(503), owire.error(503))
        for _ in range(2):
            with pytest.raises(ProxyError):
                await engine.run(_chat())
        with pytest.raises(ProxyError) as caught:
            await engine.run(_chat())
        assert caught.value.code is ErrorCode.PROVIDER_ERROR
        assert "circuit" in caught.value.message
        assert len(server.requests) == 2  # the open circuit kept the third call off the wire
        await asyncio.sleep(0.55)
        server.enqueue(owire.chat_completion("back"), owire.chat_completion("again"))
        assert (await engine.run(_chat())).output.text == "back"  # type: ignore[union-attr]
        assert (await engine.run(_chat())).output.text == "again"  # type: ignore[union-attr]
    assert len(server.requests) == 4


async def test_open_circuit_sends_traffic_to_the_next_endpoint() -> None:
    breaker = BreakerSettings(failure_threshold=1, cooldown_s=30)
    async with ProviderServer() as first, ProviderServer() as second:
        settings = settings_for(Provider.OPENAI, [first.url, second.url], breaker=breaker)
        async with engines(settings) as loaded:
            first.enqueue(owire.error(500))
            second.enqueue(*[owire.chat_completion("b") for _ in range(3)])
            for _ in range(3):
                await loaded["m"].run(_chat())
    assert len(first.requests) == 1
    assert len(second.requests) == 3


async def test_slow_provider_times_out() -> None:
    retry = RetrySettings(max_attempts=2, backoff_initial_s=0.01, jitter_ratio=0)
    async with (
        ProviderServer() as server,
        engines(
            settings_for(Provider.ANTHROPIC, [server.url], retry=retry, timeout_s=0.2)
        ) as loaded,
    ):
        server.enqueue(slow(awire.message(), 2.0), slow(awire.message(), 2.0))
        started = time.monotonic()
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat())
        elapsed_s = time.monotonic() - started
    assert caught.value.code is ErrorCode.TIMEOUT and caught.value.retryable
    assert 0.4 <= elapsed_s < 1.5
    assert len(server.requests) == 2


async def test_request_deadline_bounds_the_provider_call() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url], timeout_s=60)) as loaded,
    ):
        server.enqueue(*[slow(owire.chat_completion(), 2.0) for _ in range(3)])
        deadline_ms = time.time_ns() // 1_000_000 + 300
        started = time.monotonic()
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat(), RunContext(deadline_unix_ms=deadline_ms))
    assert caught.value.code is ErrorCode.TIMEOUT
    assert time.monotonic() - started < 1.0


async def test_concurrency_cap_queues_provider_calls() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url], max_concurrency=1)) as loaded,
    ):
        server.enqueue(slow(owire.chat_completion(), 0.2), slow(owire.chat_completion(), 0.2))
        await asyncio.gather(loaded["m"].run(_chat()), loaded["m"].run(_chat()))
    first, second = server.requests
    assert second.at_s - first.at_s >= 0.2


async def test_usage_is_metered_in_integer_micros() -> None:
    prices = ModelPrices(input_micros_per_mtok=150_000, output_micros_per_mtok=600_000)
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url], prices=prices)) as loaded,
    ):
        engine = loaded["m"]
        seen: list[UsageRecord] = []
        engine.meter.listeners.append(seen.append)
        server.enqueue(owire.chat_completion("x", usage=(1000, 10)))
        await engine.run(_chat(), RunContext(request_id="req-7"))
    # 1000 * 0.15 + 10 * 0.6 = 156 micro-units
    (record,) = seen
    assert (record.request_id, record.endpoint, record.cost_micros) == ("req-7", "ep-0", 156)
    assert engine.meter.totals.cost_micros == 156 and engine.meter.totals.requests == 1


async def test_no_prompt_key_or_provider_body_in_logs_or_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"provider-secret-detail echoing {PROMPT}"
    errors: list[str] = []
    async with ProviderServer() as server:
        for provider in (Provider.OPENAI, Provider.ANTHROPIC):
            wire_error = owire.error if provider is Provider.OPENAI else awire.error
            ok = (
                owire.chat_stream(["fine"])
                if provider is Provider.OPENAI
                else awire.message_stream([("text", ["fine"])])
            )
            async with engines(settings_for(provider, [server.url])) as loaded:
                server.enqueue(*[wire_error(500, message=echo) for _ in range(3)])
                with pytest.raises(ProxyError) as caught:
                    await loaded["m"].run(_chat())
                errors.append(str(caught.value))
                server.enqueue(wire_error(400, message=echo), ok)
                with pytest.raises(ProxyError) as caught:
                    await loaded["m"].run(_chat())
                errors.append(str(caught.value))
                await loaded["m"].run(_chat(), RunContext(emit=Collector().emit))
    logged = caplog.text + json.dumps([r.__dict__ for r in caplog.records], default=str)
    for secret in (PROMPT, "provider-secret-detail", *KEYS.values(), "fine"):
        assert secret not in logged
        assert not any(secret in e for e in errors)
    assert any(r.name == "worker.proxy.resilience" for r in caplog.records)
