"""Worker exceptions, arranged by what the caller should do.

    WorkerError
    ├── RetryableError    transient (engine busy, I/O hiccup): retry with bounded backoff,
    │                     then answer ``internal`` (retryable=True)
    └── PermanentError    the request can never succeed as sent: answer a typed error reply now

Both carry an ``ErrorCode`` and a message that is safe to send and log: it must never contain
the prompt, the input tensors or the output. Third-party exceptions are translated into these
where they enter our code (``raise PermanentError(...) from e``).
"""

from __future__ import annotations

from typing import ClassVar

from schemas.results import ErrorCode

__all__ = ["PermanentError", "RetryableError", "WorkerError"]


class WorkerError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False
    fatal: ClassVar[bool] = False
    """The engine itself is gone (e.g. vLLM's engine core died): answer this request, then
    stop the worker and exit non-zero so the orchestrator restarts it."""

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        request_id: str | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.model = model


class RetryableError(WorkerError):
    code = ErrorCode.INTERNAL
    retryable = True


class PermanentError(WorkerError):
    code = ErrorCode.BAD_REQUEST
    retryable = False
