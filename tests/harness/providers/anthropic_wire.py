"""Anthropic wire format: messages, SSE event streams and error bodies."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tests.harness.providers.server import JsonReply, SseReply

__all__ = ["error", "message", "message_stream", "text_block", "tool_use_block"]


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(block_id: str, name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": block_id, "name": name, "input": tool_input}


def _message(content: list[dict[str, Any]], stop_reason: str | None, usage: dict[str, int]) -> Any:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def message(
    content: list[dict[str, Any]] | None = None,
    *,
    stop_reason: str = "end_turn",
    usage: tuple[int, int] = (13, 5),
    cache_read: int | None = None,
) -> JsonReply:
    tokens: dict[str, int] = {"input_tokens": usage[0], "output_tokens": usage[1]}
    if cache_read is not None:
        tokens["cache_read_input_tokens"] = cache_read
    blocks = [text_block("hello")] if content is None else content
    return JsonReply(_message(blocks, stop_reason, tokens))


def message_stream(
    blocks: Sequence[tuple[str, Any]],
    *,
    stop_reason: str = "end_turn",
    usage: tuple[int, int] = (13, 5),
    pause_s: float = 0.0,
    error_after: int | None = None,
) -> SseReply:
    """``blocks``: ("text", [pieces]) or ("tool_use", (id, name, [partial_json pieces])), or
    ("thinking", [pieces]). ``error_after``: send an ``error`` event after that many events."""
    events: list[tuple[str | None, str]] = []

    def add(name: str, body: dict[str, Any]) -> None:
        events.append((name, json.dumps({"type": name} | body)))

    add(
        "message_start",
        {"message": _message([], None, {"input_tokens": usage[0], "output_tokens": 1})},
    )
    events.append(("ping", json.dumps({"type": "ping"})))
    for index, (kind, spec) in enumerate(blocks):
        if kind == "text":
            add("content_block_start", {"index": index, "content_block": text_block("")})
            for piece in spec:
                delta = {"type": "text_delta", "text": piece}
                add("content_block_delta", {"index": index, "delta": delta})
        elif kind == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            add("content_block_start", {"index": index, "content_block": start})
            for piece in spec:
                delta = {"type": "thinking_delta", "thinking": piece}
                add("content_block_delta", {"index": index, "delta": delta})
        else:
            block_id, name, pieces = spec
            start = tool_use_block(block_id, name, {})
            add("content_block_start", {"index": index, "content_block": start})
            for piece in pieces:
                delta = {"type": "input_json_delta", "partial_json": piece}
                add("content_block_delta", {"index": index, "delta": delta})
        add("content_block_stop", {"index": index})
    add(
        "message_delta",
        {
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": usage[1]},
        },
    )
    add("message_stop", {})
    if error_after is not None:
        failure = {"error": {"type": "overloaded_error", "message": "provider-secret-detail"}}
        events = [*events[:error_after], ("error", json.dumps({"type": "error"} | failure))]
    return SseReply(events, pause_s=pause_s)


def error(
    status: int,
    *,
    kind: str = "api_error",
    message: str = "provider-secret-detail",
    headers: dict[str, str] | None = None,
    delay_s: float = 0.0,
) -> JsonReply:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JsonReply(body, status, headers or {}, delay_s)
