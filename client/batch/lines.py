"""Batch input lines: one JSON object per line, parsed into a request payload or refused.

Two shapes are accepted:

- ours: ``{"custom_id": "...", "model": "demo-mlp", "body": PAYLOAD}`` where ``PAYLOAD`` is a
  request payload as ``inference-node request --input`` takes it (``{"kind": "chat", ...}`` or
  ``{"kind": "ml", ...}``);
- OpenAI's batch input: ``{"custom_id": "...", "method": "POST", "url":
  "/v1/chat/completions", "body": {"model": ..., "messages": ..., "max_tokens": ...}}``,
  translated to a chat payload (the mapping is ``_OPENAI_PARAMS`` / ``_OPENAI_SAME`` below and
  the README's "Batch jobs" section). A body field we cannot honour refuses the line instead
  of being ignored, as a provider refuses a parameter it cannot honour.

A line that cannot be used becomes an ``InvalidLine`` whose ``reason`` names fields and error
kinds only, never values (prompts and tensors must not leak into outputs or logs). Parsing is
pure and deterministic, so a resumed job classifies every line exactly as the first run did.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from client.requests import parse_payload
from schemas import limits
from schemas.codec import loads, scan, summarize_validation_error
from schemas.requests import ChatInput, MLInput
from schemas.topics import MODEL_NAME_PATTERN

__all__ = [
    "MAX_CUSTOM_ID_CHARS",
    "BatchLine",
    "InvalidLine",
    "LineParser",
    "ParsedLine",
    "iter_raw_lines",
    "parse_line",
]

MAX_CUSTOM_ID_CHARS = 512
_MODEL_RE = re.compile(MODEL_NAME_PATTERN.removeprefix("^").removesuffix("$"))
_OURS_KEYS = frozenset({"custom_id", "model", "body"})
_OPENAI_KEYS = frozenset({"custom_id", "method", "url", "body"})
_CHAT_URL = "/v1/chat/completions"
_OPENAI_PARAMS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed"}
"""OpenAI body field -> ``params`` field of our chat payload (``max_tokens``,
``max_completion_tokens`` and ``stop`` are handled on their own)."""
_OPENAI_SAME = frozenset({"messages", "tools", "tool_choice", "response_format", "user"})
"""OpenAI body fields carried over unchanged."""
_OPENAI_UNSUPPORTED = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "metadata",
        "modalities",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "reasoning_effort",
        "service_tier",
        "store",
        "stream_options",
        "top_logprobs",
        "web_search_options",
    }
)
"""OpenAI fields we know and cannot honour: named in the reason (other unknown names are
submitted text, and are not)."""


@dataclass(frozen=True)
class BatchLine:
    """A usable line: what to send, and under which ``custom_id``."""

    number: int
    """1-based line number in the input file."""
    custom_id: str
    model: str
    payload: ChatInput | MLInput


@dataclass(frozen=True)
class InvalidLine:
    """A line that is never sent. ``reason`` never echoes the line's content."""

    number: int
    custom_id: str | None
    reason: str


ParsedLine = BatchLine | InvalidLine


def iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(number, bytes)`` of each line of ``path``, 1-based, without its line ending. A final
    newline does not start another line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw


class _Refused(Exception):
    def __init__(self, reason: str, custom_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.custom_id = custom_id


def parse_line(number: int, raw: bytes) -> ParsedLine:
    """Parse one line on its own (``LineParser`` also refuses a repeated ``custom_id``)."""
    try:
        return _parse(number, raw)
    except _Refused as e:
        return InvalidLine(number, e.custom_id, f"line {number}: {e.reason}")


class LineParser:
    """Parses the lines of one file in order, refusing a ``custom_id`` seen on an earlier line
    (output lines are matched to inputs by it, so it must be unique)."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def parse(self, number: int, raw: bytes) -> ParsedLine:
        parsed = parse_line(number, raw)
        if parsed.custom_id is None:
            return parsed
        first = self._seen.setdefault(parsed.custom_id, number)
        if first != number and isinstance(parsed, BatchLine):
            return InvalidLine(
                number, parsed.custom_id, f"line {number}: custom_id repeats line {first}"
            )
        return parsed


def _parse(number: int, raw: bytes) -> BatchLine:
    if not raw.strip():
        raise _Refused("empty line")
    if len(raw) > limits.MAX_MESSAGE_BYTES:
        raise _Refused(f"line of {len(raw)} bytes exceeds {limits.MAX_MESSAGE_BYTES}")
    problem = scan(raw)
    if problem is not None:
        raise _Refused(problem)
    try:
        obj = loads(raw)
    except ValueError:
        raise _Refused("not UTF-8 JSON (I-JSON)") from None
    if not isinstance(obj, dict):
        raise _Refused(f"JSON {type(obj).__name__} where an object was expected")
    custom_id = _custom_id(obj)
    try:
        if "method" in obj or "url" in obj:
            model, payload = _openai_line(obj)
        else:
            model, payload = _our_line(obj)
    except _Refused as e:
        raise _Refused(e.reason, custom_id) from None
    return BatchLine(number, custom_id, model, payload)


def _custom_id(obj: dict[str, Any]) -> str:
    value = obj.get("custom_id")
    if not isinstance(value, str) or not value:
        raise _Refused("custom_id is missing or not a non-empty string")
    if len(value) > MAX_CUSTOM_ID_CHARS:
        raise _Refused(f"custom_id longer than {MAX_CUSTOM_ID_CHARS} characters")
    return value


def _model(value: object) -> str:
    if not isinstance(value, str) or not _MODEL_RE.fullmatch(value):
        raise _Refused("model is missing or not a model name")
    return value


def _unknown_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    if set(obj) - allowed:
        raise _Refused(f"unknown {where} field")


def _payload(body: dict[str, Any]) -> ChatInput | MLInput:
    try:
        return parse_payload(body)
    except ValidationError as e:
        model = MLInput if body.get("kind") == "ml" else ChatInput
        raise _Refused(summarize_validation_error(e, model)) from None


def _our_line(obj: dict[str, Any]) -> tuple[str, ChatInput | MLInput]:
    _unknown_keys(obj, _OURS_KEYS, "line")
    model = _model(obj.get("model"))
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Refused("body is missing or not an object")
    if body.get("kind") not in ("chat", "ml"):
        raise _Refused('body.kind must be "chat" or "ml"')
    return model, _payload(body)


def _openai_line(obj: dict[str, Any]) -> tuple[str, ChatInput | MLInput]:
    _unknown_keys(obj, _OPENAI_KEYS, "line")
    if obj.get("method") != "POST":
        raise _Refused('method must be "POST"')
    if obj.get("url") != _CHAT_URL:
        raise _Refused(f"url must be {_CHAT_URL} (the only endpoint a batch may call)")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Refused("body is missing or not an object")
    return _model(body.get("model")), _payload(_translate_openai(body))


def _translate_openai(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI chat-completions body -> our chat payload (validated by the caller)."""
    payload: dict[str, Any] = {"kind": "chat"}
    params: dict[str, Any] = {}
    for key, value in body.items():
        if key == "model":
            continue
        if key in _OPENAI_SAME:
            payload[key] = _messages(value) if key == "messages" else value
        elif key in _OPENAI_PARAMS:
            if value is not None:
                params[_OPENAI_PARAMS[key]] = value
        elif key in ("max_tokens", "max_completion_tokens"):
            if "max_tokens" in params:
                raise _Refused("both max_tokens and max_completion_tokens are set")
            if value is not None:
                params["max_tokens"] = value
        elif key == "stop":
            if value is not None:
                params["stop"] = [value] if isinstance(value, str) else value
        elif key == "n":
            if value not in (None, 1):
                raise _Refused("body.n other than 1 is not supported")
        elif key == "stream":
            if value not in (None, False):
                raise _Refused("body.stream is not supported in a batch")
        elif key in _OPENAI_UNSUPPORTED:
            raise _Refused(f"body.{key} is not supported")
        else:
            raise _Refused("unknown body field")
    if params:
        payload["params"] = params
    return payload


def _messages(value: object) -> object:
    """OpenAI message content may be a list of parts: text parts are joined; any other part
    (images, audio, files) refuses the line."""
    if not isinstance(value, list):
        return value
    out: list[object] = []
    for message in value:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise _Refused("a message content part is not text")
                texts.append(part["text"])
            message = {**message, "content": "".join(texts)}
        out.append(message)
    return out
