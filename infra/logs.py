"""Structured JSON logs with request and trace ids, and never user data.

Records carry ids and error types only: callers pass request ids and exception *types* through
``extra``, never prompts, outputs or exception text. Two guards back that convention up:

- fields named like user data (``prompt``, ``payload``, ``output``, ...) are replaced by
  ``"[redacted]"`` whatever their value, so a careless ``extra=`` cannot leak a prompt;
- only the exception *type* of ``exc_info`` is written, never its message or traceback
  (runtimes and SDKs echo inputs in both).

Ids come from a per-task context (:func:`log_context`): intake binds the request id, trace id
and span id while it handles a request, so every line logged on its behalf (pipeline, engines,
publisher) carries them without each call site passing them along. Each request runs in its own
asyncio task, and tasks copy the context, so concurrent requests never see each other's ids.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, Final

__all__ = [
    "REDACTED",
    "ContextFilter",
    "JsonFormatter",
    "bind_log_context",
    "configure_logging",
    "current_log_context",
    "log_context",
]

REDACTED: Final = "[redacted]"

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# Field names whose values are user data by construction. Matched case-insensitively.
_USER_DATA_FIELDS: Final = frozenset(
    {
        "body",
        "completion",
        "content",
        "input",
        "inputs",
        "messages",
        "output",
        "outputs",
        "payload",
        "plaintext",
        "prompt",
        "response",
        "tensors",
        "text",
    }
)

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "og_log_context", default=None
)


def current_log_context() -> dict[str, str]:
    """The ids bound to the running task (a copy; empty outside a request)."""
    return dict(_context.get() or {})


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Bind ids (``request_id``, ``trace_id``, ``span_id``) to every record logged inside.

    Nested calls add to (and may override) the outer fields; ``None`` values are skipped.
    """
    merged = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: str | None) -> None:
    """Add ids to the current task's context until the task ends (no reset needed: each
    request runs in its own task, whose context copy dies with it)."""
    _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})


class ContextFilter(logging.Filter):
    """Copies the task's bound ids onto each record (explicit ``extra`` fields win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = REDACTED if key.lower() in _USER_DATA_FIELDS else value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages from runtimes and SDKs may echo user input.
            entry["exc_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
