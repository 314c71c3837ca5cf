"""Pure parts of the proxy's reliability policy: Retry-After parsing, failure classification,
backoff, the circuit breaker and the retry runner, on a fake clock."""

from __future__ import annotations

import email.utils

import pytest

from schemas.results import ErrorCode
from worker.proxy.errors import (
    FailureKind,
    ProviderFailure,
    ProxyError,
    classify_status,
    parse_retry_after,
)
from worker.proxy.resilience import (
    BreakerState,
    CircuitBreaker,
    EndpointSlot,
    RetryRunner,
    backoff_s,
)
from worker.proxy.settings import BreakerSettings, RetrySettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "nonsense", "retry-after": "9"}, 9.0),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    now_s = 1_800_000_000.0
    header = email.utils.formatdate(now_s + 12, usegmt=True)
    assert parse_retry_after({"Retry-After": header}, now_s=now_s) == pytest.approx(12.0)
    past = email.utils.formatdate(now_s - 12, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now_s=now_s) == 0.0


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (429, None, FailureKind.RATE_LIMITED),
        (500, None, FailureKind.SERVER),
        (529, None, FailureKind.SERVER),
        (408, None, FailureKind.SERVER),
        (401, None, FailureKind.ENDPOINT),
        (404, None, FailureKind.ENDPOINT),
        (400, {"error": {"code": "content_filter"}}, FailureKind.FILTERED),
        (400, {"error": {"code": "other", "message": "x"}}, FailureKind.INVALID),
        (422, "not json", FailureKind.INVALID),
    ],
)
def test_classify_status(status: int, body: object, kind: FailureKind) -> None:
    failure = classify_status(status, {"retry-after": "2"}, body)
    assert failure.kind is kind
    assert str(status) in failure.message and "x" not in failure.message.replace("HTTP", "")


def test_backoff_grows_and_is_capped() -> None:
    policy = RetrySettings(backoff_initial_s=0.5, backoff_max_s=3, jitter_ratio=0.5)
    assert [backoff_s(n, policy, rng=lambda: 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff_s(1, policy, rng=lambda: 1.0) == 0.75


def _state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # read through a call: mypy would narrow the property between reads


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=3, cooldown_s=10), clock=clock)
    for _ in range(2):
        assert breaker.acquire()
        breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED
    breaker.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN and not breaker.acquire()
    clock.now += 10
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.acquire()
    assert not breaker.acquire()  # one probe at a time
    breaker.record_failure()  # the probe failed: open again for a full cool-down
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 9.9
    assert not breaker.available()
    clock.now += 0.1
    assert breaker.acquire()
    breaker.record_success()
    assert _state(breaker) is BreakerState.CLOSED and breaker.acquire() and breaker.acquire()


def _slots(clock: FakeClock, *names: str, threshold: int = 5) -> list[EndpointSlot[str]]:
    settings = BreakerSettings(failure_threshold=threshold, cooldown_s=30)
    return [EndpointSlot(n, n, CircuitBreaker(settings, name=n, clock=clock)) for n in names]


def _runner(clock: FakeClock, **policy: float) -> RetryRunner:
    settings = RetrySettings.model_validate({"backoff_initial_s": 1, "jitter_ratio": 0, **policy})
    return RetryRunner(settings, clock=clock, sleep=clock.sleep, rng=lambda: 0.0)


class Script:
    """A provider call that fails as scripted, then answers with the endpoint name."""

    def __init__(self, *failures: ProviderFailure | None) -> None:
        self.failures = list(failures)
        self.calls: list[str] = []

    async def __call__(self, slot: EndpointSlot[str], timeout_s: float) -> str:
        self.calls.append(slot.name)
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return slot.client


async def test_runner_backs_off_on_the_same_endpoint() -> None:
    clock = FakeClock()
    call = Script(ProviderFailure(FailureKind.SERVER, 500), ProviderFailure(FailureKind.SERVER))
    result = await _runner(clock).run(_slots(clock, "a"), call, timeout_s=5)
    assert result == "a" and call.calls == ["a", "a", "a"]
    assert clock.slept == [1.0, 2.0]


async def test_runner_honours_retry_after_over_backoff() -> None:
    clock = FakeClock()
    call = Script(ProviderFailure(FailureKind.RATE_LIMITED, 429, retry_after_s=7))
    await _runner(clock).run(_slots(clock, "a"), call, timeout_s=5)
    assert clock.slept == [7.0]


async def test_runner_fails_over_without_waiting() -> None:
    clock = FakeClock()
    call = Script(ProviderFailure(FailureKind.RATE_LIMITED, 429, retry_after_s=7))
    result = await _runner(clock).run(_slots(clock, "a", "b"), call, timeout_s=5)
    assert result == "b" and call.calls == ["a", "b"] and clock.slept == []


async def test_runner_gives_up_when_the_wait_passes_the_deadline() -> None:
    clock = FakeClock()
    call = Script(ProviderFailure(FailureKind.RATE_LIMITED, 429, retry_after_s=7))
    with pytest.raises(ProxyError) as caught:
        await _runner(clock).run(_slots(clock, "a"), call, timeout_s=5, deadline_s=clock.now + 5)
    assert caught.value.code is ErrorCode.RATE_LIMITED and caught.value.retryable
    assert clock.slept == []


async def test_runner_does_not_retry_the_requests_own_fault() -> None:
    clock = FakeClock()
    call = Script(ProviderFailure(FailureKind.INVALID, 400))
    slots = _slots(clock, "a", "b", threshold=1)
    with pytest.raises(ProxyError) as caught:
        await _runner(clock).run(slots, call, timeout_s=5)
    assert caught.value.code is ErrorCode.INVALID_REQUEST and not caught.value.retryable
    assert call.calls == ["a"]
    assert slots[0].breaker.state is BreakerState.CLOSED  # not the endpoint's fault


async def test_runner_stops_retrying_once_the_client_holds_a_piece() -> None:
    clock = FakeClock()
    call = Script(ProviderFailure(FailureKind.SERVER, 500))
    with pytest.raises(ProxyError) as caught:
        await _runner(clock).run(_slots(clock, "a"), call, timeout_s=5, may_retry=lambda: False)
    assert caught.value.code is ErrorCode.PROVIDER_ERROR and call.calls == ["a"]


async def test_runner_skips_open_circuits_and_fails_fast_when_all_are_open() -> None:
    clock = FakeClock()
    slots = _slots(clock, "a", "b", threshold=1)
    call = Script(ProviderFailure(FailureKind.SERVER, 500), ProviderFailure(FailureKind.SERVER))
    with pytest.raises(ProxyError):
        await _runner(clock, max_attempts=2).run(slots, call, timeout_s=5)
    assert [s.breaker.state for s in slots] == [BreakerState.OPEN, BreakerState.OPEN]
    later = Script()
    with pytest.raises(ProxyError) as caught:
        await _runner(clock).run(slots, later, timeout_s=5)
    assert "circuit" in caught.value.message and later.calls == []


async def test_a_timeout_caused_by_the_request_deadline_spares_the_endpoint() -> None:
    clock = FakeClock()
    slots = _slots(clock, "a", threshold=1)
    call = Script(ProviderFailure(FailureKind.TIMEOUT))
    with pytest.raises(ProxyError) as caught:
        await _runner(clock).run(slots, call, timeout_s=60, deadline_s=clock.now + 2)
    assert caught.value.code is ErrorCode.TIMEOUT and call.calls == ["a"]
    assert slots[0].breaker.state is BreakerState.CLOSED
    call = Script(ProviderFailure(FailureKind.TIMEOUT))  # the model's own timeout: it counts
    with pytest.raises(ProxyError):
        await _runner(clock, max_attempts=1).run(slots, call, timeout_s=1)
    assert slots[0].breaker.state is BreakerState.OPEN


async def test_an_earlier_retry_after_holds_later_requests_back() -> None:
    clock = FakeClock()
    slots = _slots(clock, "a")
    first = Script(ProviderFailure(FailureKind.RATE_LIMITED, 429, retry_after_s=30))
    with pytest.raises(ProxyError):
        await _runner(clock, max_retry_after_s=10).run(slots, first, timeout_s=5)
    second = Script()
    with pytest.raises(ProxyError) as caught:
        await _runner(clock, max_retry_after_s=10).run(slots, second, timeout_s=5)
    assert caught.value.code is ErrorCode.RATE_LIMITED and second.calls == []
    clock.now += 30
    assert await _runner(clock).run(slots, second, timeout_s=5) == "a"
