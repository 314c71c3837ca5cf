"""Provider failures, classified by what the retry policy should do, and the errors we answer.

    ProviderFailure              one failed provider call (an SDK exception, translated at the
                                 edge by the engine): kind, HTTP status, Retry-After
    WorkerError (worker.errors)
    └── PermanentError
        └── ProxyError           the final answer after our own retries and failover: the
                                 pipeline must not retry again, but the reply says whether the
                                 client may (``retryable``)

Nothing here carries a provider's error body or a key: messages are fixed texts plus the HTTP
status, so they are safe in logs, error replies and the DLQ.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from enum import Enum
from typing import Any

from schemas.results import ErrorCode
from worker.errors import PermanentError

__all__ = [
    "FailureKind",
    "ProviderFailure",
    "ProxyError",
    "classify_status",
    "invalid_request",
    "parse_retry_after",
]


class FailureKind(Enum):
    """``retry``: may succeed on a later call (same or other endpoint); ``failover``: this
    endpoint cannot serve it (bad key, unknown model there) but another might; ``final``: the
    request itself is at fault, no endpoint will do better."""

    RATE_LIMITED = ("retry", ErrorCode.RATE_LIMITED)
    SERVER = ("retry", ErrorCode.PROVIDER_ERROR)
    TIMEOUT = ("retry", ErrorCode.TIMEOUT)
    CONNECTION = ("retry", ErrorCode.PROVIDER_ERROR)
    BAD_RESPONSE = ("retry", ErrorCode.PROVIDER_ERROR)
    ENDPOINT = ("failover", ErrorCode.PROVIDER_ERROR)
    INVALID = ("final", ErrorCode.INVALID_REQUEST)
    FILTERED = ("final", ErrorCode.CONTENT_FILTERED)

    @property
    def policy(self) -> str:
        return str(self.value[0])

    @property
    def code(self) -> ErrorCode:
        code: ErrorCode = self.value[1]
        return code


_MESSAGES = {
    FailureKind.RATE_LIMITED: "provider rate limit",
    FailureKind.SERVER: "provider server error",
    FailureKind.TIMEOUT: "provider did not answer in time",
    FailureKind.CONNECTION: "provider unreachable",
    FailureKind.BAD_RESPONSE: "provider answer could not be used",
    FailureKind.ENDPOINT: "provider refused this node's endpoint",
    FailureKind.INVALID: "provider rejected the request as invalid",
    FailureKind.FILTERED: "provider refused the content",
}


class ProviderFailure(Exception):
    """One failed provider call; ``str()`` is safe to log."""

    def __init__(
        self, kind: FailureKind, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = _MESSAGES[self.kind]
        return f"{text} (HTTP {self.status})" if self.status else text

    @property
    def counts_against_endpoint(self) -> bool:
        """Failures of the endpoint (not of the request) feed its circuit breaker."""
        return self.kind.policy != "final"


class ProxyError(PermanentError):
    """Final: raised after the proxy's own retry policy ran, so the pipeline answers at once."""

    def __init__(self, message: str, *, code: ErrorCode, retryable: bool = False) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable

    @classmethod
    def from_failure(cls, failure: ProviderFailure) -> ProxyError:
        return cls(
            failure.message, code=failure.kind.code, retryable=failure.kind.policy != "final"
        )


def invalid_request(message: str) -> ProxyError:
    """The provider cannot do what the request asks: never sent, never silently dropped."""
    return ProxyError(message, code=ErrorCode.INVALID_REQUEST)


_CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})


def classify_status(status: int, headers: Mapping[str, str], body: Any) -> ProviderFailure:
    """Map an HTTP error answer to a failure. ``body`` is only inspected for a machine-readable
    error code (content-filter refusals); it is never copied anywhere."""
    retry_after = parse_retry_after(headers)
    if status == 429:
        return ProviderFailure(FailureKind.RATE_LIMITED, status, retry_after)
    if status in (408, 409, 425) or status >= 500:
        return ProviderFailure(FailureKind.SERVER, status, retry_after)
    if status in (401, 402, 403, 404):
        return ProviderFailure(FailureKind.ENDPOINT, status)
    if _error_code(body) in _CONTENT_FILTER_CODES:
        return ProviderFailure(FailureKind.FILTERED, status)
    if 400 <= status < 500:
        return ProviderFailure(FailureKind.INVALID, status)
    return ProviderFailure(FailureKind.BAD_RESPONSE, status)


def _error_code(body: Any) -> str | None:
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            code = inner.get("code")
            return code if isinstance(code, str) else None
    return None


def parse_retry_after(headers: Mapping[str, str], now_s: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred, as the SDKs do), or ``Retry-After``
    as delta-seconds or an HTTP date. ``None`` when absent or unparseable; never negative."""
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value_ms = float(raw_ms)
        except ValueError:
            value_ms = math.nan
        if math.isfinite(value_ms) and value_ms >= 0:
            return value_ms / 1000
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now_s is None else now_s)
        return max(0.0, seconds)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
