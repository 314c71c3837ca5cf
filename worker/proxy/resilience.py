"""Our retry policy for provider calls: backoff, Retry-After, failover, circuit breakers.

The SDKs' own retries are disabled (``max_retries=0``) so this is the one policy that runs:

- every request gets at most ``max_attempts`` provider calls, across all endpoints, inside its
  time budget (the model's ``timeout_s`` per call, the request's deadline for the whole);
- a failed call is retried on the endpoint that is ready first: another endpoint at once
  (failover), the same one after an exponential backoff, or after its ``Retry-After`` when
  the provider named one; a wait longer than ``max_retry_after_s`` or past the deadline ends
  the request with the failure's typed error instead of sleeping;
- an endpoint that refuses the node (bad key, unknown model there) is not tried again for
  this request; a request the provider calls invalid is not retried at all;
- each endpoint has a circuit breaker shared by every model using it: ``failure_threshold``
  consecutive endpoint failures open it, it refuses calls for ``cooldown_s``, then lets one
  probe through (half-open) that closes it again on success;
- once a streamed answer has sent a piece to the client, nothing is retried: the client
  would see the piece twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from schemas.results import ErrorCode
from worker.proxy.errors import FailureKind, ProviderFailure, ProxyError
from worker.proxy.settings import BreakerSettings, RetrySettings

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "EndpointSlot",
    "ProviderObserver",
    "RetryRunner",
    "backoff_s",
]

log = logging.getLogger(__name__)

C = TypeVar("C")
T = TypeVar("T")
Clock = Callable[[], float]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker for one endpoint. Not thread-safe; one event loop."""

    def __init__(
        self, settings: BreakerSettings, *, name: str = "", clock: Clock = time.monotonic
    ) -> None:
        self._threshold = settings.failure_threshold
        self._cooldown_s = settings.cooldown_s
        self._name = name
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._cooled_down():
            return BreakerState.HALF_OPEN
        return self._state

    def _cooled_down(self) -> bool:
        return self._clock() >= self._opened_at + self._cooldown_s

    def available(self) -> bool:
        """Would ``acquire`` succeed now? (No side effect.)"""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probing
        )

    def acquire(self) -> bool:
        """Claim the right to call: always when closed, the single probe when half-open."""
        if not self.available():
            return False
        if self.state is BreakerState.HALF_OPEN:
            self._state = BreakerState.HALF_OPEN
            self._probing = True
        return True

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            log.info("circuit closed", extra={"endpoint": self._name})
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self._state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            if self._state is not BreakerState.OPEN:
                log.warning(
                    "circuit opened", extra={"endpoint": self._name, "failures": self._failures}
                )
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def release(self) -> None:
        """The call ended without a verdict on the endpoint (the request was at fault)."""
        self._probing = False


@dataclass(eq=False)
class EndpointSlot(Generic[C]):
    """One endpoint as the runner sees it: its SDK client, breaker and Retry-After pause."""

    name: str
    client: C
    breaker: CircuitBreaker
    not_before_s: float = field(default=0.0)
    """Monotonic time before which the provider asked us not to call (Retry-After)."""
    provider: str = "unknown"
    """``openai`` or ``anthropic``: the metrics label of calls through this endpoint."""


class ProviderObserver(Protocol):
    """What the runner reports about provider calls (``worker.metrics.WorkerMetrics``)."""

    def provider_call(self, provider: str, seconds: float) -> None: ...

    def provider_error(self, provider: str, code: ErrorCode | str) -> None: ...

    def provider_retry(self, provider: str) -> None: ...


def backoff_s(retry: int, policy: RetrySettings, rng: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``retry`` (1-based) on the same endpoint."""
    base = min(
        policy.backoff_max_s, policy.backoff_initial_s * policy.backoff_multiplier ** (retry - 1)
    )
    return base * (1 + policy.jitter_ratio * rng())


class RetryRunner:
    """Runs one request's provider calls under the policy (see the module docstring)."""

    def __init__(
        self,
        policy: RetrySettings,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        observer: ProviderObserver | None = None,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._observer = observer

    async def run(
        self,
        slots: Sequence[EndpointSlot[C]],
        call: Callable[[EndpointSlot[C], float], Awaitable[T]],
        *,
        timeout_s: float,
        deadline_s: float | None = None,
        may_retry: Callable[[], bool] = lambda: True,
        model: str = "",
    ) -> T:
        """``call(slot, timeout_s)`` makes one provider call and raises ``ProviderFailure``
        on failure. ``deadline_s`` is on this runner's clock (monotonic)."""
        deadline = math.inf if deadline_s is None else deadline_s
        excluded: set[str] = set()
        last: ProviderFailure | None = None
        last_slot: EndpointSlot[C] | None = None
        for attempt in range(1, self._policy.max_attempts + 1):
            now = self._clock()
            slot, ready_at = self._choose(slots, excluded, last_slot, attempt, now)
            if slot is None:
                raise _give_up(last) if last else _unavailable()
            wait_s = ready_at - now
            if ready_at >= deadline or wait_s > self._policy.max_retry_after_s:
                if last is None and slot.not_before_s > now:
                    last = ProviderFailure(FailureKind.RATE_LIMITED)  # an earlier Retry-After
                raise _give_up(last) if last else _timeout()
            if wait_s > 0:
                await self._sleep(wait_s)
            if last is not None and self._observer is not None:
                self._observer.provider_retry(slot.provider)
            if not slot.breaker.acquire():
                last_slot = slot
                continue  # another request took the half-open probe meanwhile
            budget_s = min(timeout_s, deadline - self._clock())
            if budget_s <= 0:
                slot.breaker.release()
                raise _give_up(last) if last else _timeout()
            started_s = self._clock()
            try:
                async with asyncio.timeout(budget_s):
                    result = await call(slot, budget_s)
            except (ProviderFailure, TimeoutError) as e:
                failure = (
                    e if isinstance(e, ProviderFailure) else ProviderFailure(FailureKind.TIMEOUT)
                )
                if self._observer is not None:
                    self._observer.provider_error(slot.provider, failure.kind.code)
                if failure.kind is FailureKind.TIMEOUT and budget_s < timeout_s:
                    # The request's own deadline cut the call short: not the endpoint's fault
                    # (a client with tiny deadlines must not open circuits for everyone).
                    slot.breaker.release()
                    raise ProxyError.from_failure(failure) from None
                self._record(slot, failure, model, attempt)
                if failure.kind.policy == "final" or not may_retry():
                    raise ProxyError.from_failure(failure) from None
                if failure.kind.policy == "failover":
                    excluded.add(slot.name)
                last, last_slot = failure, slot
                continue
            except BaseException:
                slot.breaker.release()
                raise
            slot.breaker.record_success()
            if self._observer is not None:
                self._observer.provider_call(slot.provider, self._clock() - started_s)
            return result
        raise _give_up(last) if last else _unavailable()

    def _choose(
        self,
        slots: Sequence[EndpointSlot[C]],
        excluded: set[str],
        last_slot: EndpointSlot[C] | None,
        attempt: int,
        now: float,
    ) -> tuple[EndpointSlot[C] | None, float]:
        """The endpoint ready first (ties: configured order), and when it is ready."""
        best: EndpointSlot[C] | None = None
        best_at = math.inf
        for slot in slots:
            if slot.name in excluded or not slot.breaker.available():
                continue
            ready_at = max(now, slot.not_before_s)
            if slot is last_slot:
                ready_at = max(ready_at, now + backoff_s(attempt - 1, self._policy, self._rng))
            if ready_at < best_at:
                best, best_at = slot, ready_at
        return best, best_at

    def _record(
        self, slot: EndpointSlot[C], failure: ProviderFailure, model: str, attempt: int
    ) -> None:
        if failure.counts_against_endpoint:
            slot.breaker.record_failure()
        else:
            slot.breaker.release()
        if failure.retry_after_s is not None:
            slot.not_before_s = max(slot.not_before_s, self._clock() + failure.retry_after_s)
        log.warning(
            "provider call failed",
            extra={
                "model": model,
                "endpoint": slot.name,
                "attempt": attempt,
                "failure": failure.kind.name,
                "status": failure.status,
                "retry_after_s": failure.retry_after_s,
            },
        )


def _give_up(failure: ProviderFailure) -> ProxyError:
    return ProxyError.from_failure(failure)


def _unavailable() -> ProxyError:
    return ProxyError(
        "provider unavailable: every endpoint's circuit is open",
        code=ErrorCode.PROVIDER_ERROR,
        retryable=True,
    )


def _timeout() -> ProxyError:
    return ProxyError(
        "deadline reached before the provider could be called",
        code=ErrorCode.TIMEOUT,
        retryable=True,
    )
