"""OpenAI wire format: chat completions, legacy completions, SSE chunks and error bodies."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tests.harness.providers.server import JsonReply, SseReply

__all__ = [
    "chat_completion",
    "chat_stream",
    "completion",
    "completion_stream",
    "error",
    "tool_call",
]


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _usage(prompt: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def chat_completion(
    text: str | None = "hello",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str = "stop",
    refusal: str | None = None,
    usage: tuple[int, int] = (11, 7),
    model: str = "gpt-test",
) -> JsonReply:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": refusal}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return JsonReply(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
            ],
            "usage": _usage(*usage),
        }
    )


def _chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-test",
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


def chat_stream(
    pieces: Sequence[str] = (),
    *,
    tool_pieces: Sequence[tuple[int, str | None, str | None, str]] = (),
    finish_reason: str = "stop",
    usage: tuple[int, int] = (11, 7),
    pause_s: float = 0.0,
) -> SseReply:
    """``tool_pieces``: (index, id, name, arguments piece) in send order."""
    events = [_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    for piece in pieces:
        events.append(_chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
    for index, call_id, name, args in tool_pieces:
        call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
        if call_id is not None:
            call |= {"id": call_id, "type": "function"}
        if name is not None:
            call["function"]["name"] = name
        events.append(_chunk([{"index": 0, "delta": {"tool_calls": [call]}}]))
    events.append(_chunk([{"index": 0, "delta": {}, "finish_reason": finish_reason}]))
    events.append(_chunk([], _usage(*usage)))
    events.append("[DONE]")
    return SseReply([(None, e) for e in events], pause_s=pause_s)


def completion(
    text: str = "hello", *, finish_reason: str = "stop", usage: tuple[int, int] = (5, 3)
) -> JsonReply:
    return JsonReply(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": "gpt-test-instruct",
            "choices": [
                {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            ],
            "usage": _usage(*usage),
        }
    )


def completion_stream(
    pieces: list[str], *, finish_reason: str = "stop", usage: tuple[int, int] = (5, 3)
) -> SseReply:
    def chunk(text: str, finish: str | None) -> str:
        return json.dumps(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1_700_000_000,
                "model": "gpt-test-instruct",
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }
        )

    events = [chunk(p, None) for p in pieces] + [chunk("", finish_reason)]
    events.append(
        json.dumps(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1_700_000_000,
                "model": "gpt-test-instruct",
                "choices": [],
                "usage": _usage(*usage),
            }
        )
    )
    events.append("[DONE]")
    return SseReply([(None, e) for e in events])


def error(
    status: int,
    *,
    code: str | None = None,
    message: str = "provider-secret-detail",
    headers: dict[str, str] | None = None,
    delay_s: float = 0.0,
) -> JsonReply:
    """An error body whose message tests can search for in logs and errors (it must never
    leak)."""
    body = {"error": {"message": message, "type": "error", "param": None, "code": code}}
    return JsonReply(body, status, headers or {}, delay_s)
