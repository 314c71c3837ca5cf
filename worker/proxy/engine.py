"""What every proxy engine shares: the Engine protocol on top of a provider-specific call.

A provider engine (``worker.proxy.openai_engine``, ``worker.proxy.anthropic_engine``) supplies two
things: ``translate`` (our ``ChatInput`` → SDK keyword arguments, refusing what the provider
cannot do) and ``call`` (one SDK call that feeds an ``OutputBuilder`` and translates SDK
exceptions into ``ProviderFailure`` where they enter our code). This class adds the rest:
the per-model concurrency cap, the time budget from the request's deadline, our retry policy
with failover and circuit breakers, usage metering, and the model digest.

``model_digest`` of a proxied model = hex sha256 of the UTF-8 bytes ``"<provider>:<api_model>"``
(e.g. ``sha256("openai:gpt-4o-mini")``): it names what answered, since there is no artifact.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from schemas.requests import ChatInput, MLInput
from schemas.results import ChatOutput, ErrorCode, FinishReason, Usage
from worker.engines.base import EngineResult, RunContext
from worker.errors import PermanentError
from worker.proxy.assemble import OutputBuilder
from worker.proxy.errors import ProxyError
from worker.proxy.metering import UsageMeter
from worker.proxy.resilience import EndpointSlot, RetryRunner
from worker.proxy.settings import ProxiedModel

__all__ = ["ProxyEngine", "SharedClient", "proxied_model_digest"]

C = TypeVar("C")


def proxied_model_digest(provider: str, api_model: str) -> str:
    return hashlib.sha256(f"{provider}:{api_model}".encode()).hexdigest()


class SharedClient(Generic[C]):
    """One SDK client per endpoint per process, shared by every model using the endpoint;
    closed when the last engine holding it closes."""

    def __init__(self, client: C, close: Callable[[], Awaitable[None]]) -> None:
        self.client = client
        self._close = close
        self._holders = 0

    def hold(self) -> C:
        self._holders += 1
        return self.client

    async def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            await self._close()


class ProxyEngine(ABC, Generic[C]):
    def __init__(
        self,
        model: ProxiedModel,
        slots: Sequence[EndpointSlot[C]],
        shared: Sequence[SharedClient[C]],
        runner: RetryRunner,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self._slots = list(slots)
        self._shared = list(shared)
        for client in self._shared:
            client.hold()
        self._runner = runner
        self._clock = clock
        self._wall_clock = wall_clock
        self._concurrency = asyncio.Semaphore(model.max_concurrency)
        self._digest = proxied_model_digest(model.provider.value, model.api_model)
        self.meter = UsageMeter(model.name, model.provider.value, model.prices)
        """Usage hook for metrics: running totals plus listeners (see ``metering``)."""
        self._closed = False

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def model_digest(self) -> str:
        return self._digest

    @abstractmethod
    def translate(self, payload: ChatInput) -> dict[str, Any]:
        """SDK keyword arguments for ``payload``; raises ``ProxyError`` (invalid_request)."""

    @abstractmethod
    async def call(
        self,
        client: C,
        kwargs: dict[str, Any],
        builder: OutputBuilder,
        *,
        stream: bool,
        timeout_s: float,
    ) -> tuple[FinishReason, Usage]:
        """One provider call feeding ``builder``; raises ``ProviderFailure`` on failure."""

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        if not isinstance(payload, ChatInput):
            raise PermanentError(
                f"model {self.model.name} takes chat payloads", code=ErrorCode.BAD_REQUEST
            )
        ctx = ctx or RunContext()
        kwargs = self.translate(payload)
        deadline_s: float | None = None
        if ctx.deadline_unix_ms is not None:
            deadline_s = self._clock() + (ctx.deadline_unix_ms / 1000 - self._wall_clock())
        builders: list[OutputBuilder] = []

        async def attempt(slot: EndpointSlot[C], timeout_s: float) -> tuple[ChatOutput, Usage, str]:
            builder = OutputBuilder(ctx.emit)
            builders.append(builder)
            finish, usage = await self.call(
                slot.client, kwargs, builder, stream=ctx.emit is not None, timeout_s=timeout_s
            )
            return builder.finish(finish), usage, slot.name

        await self._acquire(deadline_s)
        try:
            output, usage, endpoint = await self._runner.run(
                self._slots,
                attempt,
                timeout_s=self.model.timeout_s,
                deadline_s=deadline_s,
                may_retry=lambda: not (builders and builders[-1].emitted),
                model=self.model.name,
            )
        finally:
            self._concurrency.release()
        self.meter.record(ctx.request_id, endpoint, usage.input_tokens, usage.output_tokens)
        return EngineResult(output, usage)

    async def _acquire(self, deadline_s: float | None) -> None:
        if deadline_s is None:
            await self._concurrency.acquire()
            return
        try:
            async with asyncio.timeout(max(0.0, deadline_s - self._clock())):
                await self._concurrency.acquire()
        except TimeoutError:
            raise ProxyError(
                "deadline reached while waiting for a provider slot",
                code=ErrorCode.TIMEOUT,
                retryable=True,
            ) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in self._shared:
            await client.release()
