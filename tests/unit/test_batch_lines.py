"""Batch input lines: our shape and OpenAI's, refusals that never echo the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client.batch.lines import (
    MAX_CUSTOM_ID_CHARS,
    BatchLine,
    InvalidLine,
    LineParser,
    iter_raw_lines,
    parse_line,
)
from schemas.requests import ChatInput, MLInput

SECRET = "zebra-secret-prompt"
"""Put into every refused line: no reason may contain it."""

ML_BODY = {
    "kind": "ml",
    "tensors": {"x": {"dtype": "float32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}},
}
CHAT_BODY = {"kind": "chat", "messages": [{"role": "user", "content": SECRET}]}


def _raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _ok(obj: Any, number: int = 1) -> BatchLine:
    parsed = parse_line(number, _raw(obj))
    assert isinstance(parsed, BatchLine), parsed
    return parsed


def test_our_ml_and_chat_lines() -> None:
    ml = _ok({"custom_id": "a", "model": "demo-mlp", "body": ML_BODY}, number=3)
    assert (ml.number, ml.custom_id, ml.model) == (3, "a", "demo-mlp")
    assert isinstance(ml.payload, MLInput)
    body = {**CHAT_BODY, "params": {"max_tokens": 4, "seed": 7}}
    chat = _ok({"custom_id": "b", "model": "demo-lm", "body": body})
    assert isinstance(chat.payload, ChatInput)
    assert chat.payload.params.max_tokens == 4 and chat.payload.params.seed == 7


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def test_openai_chat_line_maps_onto_our_chat_payload() -> None:
    line = _ok(
        {
            "custom_id": "req-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "demo-lm",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [_text("hi "), _text("there")]},
                ],
                "max_completion_tokens": 5,
                "temperature": 0.5,
                "top_p": 0.9,
                "seed": 3,
                "stop": "\n",
                "n": 1,
                "stream": False,
                "user": "u-1",
            },
        }
    )
    assert line.model == "demo-lm" and line.custom_id == "req-1"
    payload = line.payload
    assert isinstance(payload, ChatInput)
    assert [m.content for m in payload.messages] == ["be brief", "hi there"]
    params = payload.params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (
        5,
        0.5,
        0.9,
        3,
        ["\n"],
    )
    assert payload.user == "u-1"


def test_openai_tools_and_response_format_carry_over() -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    line = _ok(
        {
            "custom_id": "t",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "demo-lm",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 2,
                "tools": [tool],
                "tool_choice": "auto",
                "response_format": {"type": "json_object"},
            },
        }
    )
    assert isinstance(line.payload, ChatInput)
    assert line.payload.tools is not None and line.payload.tools[0].function.name == "lookup"
    assert line.payload.response_format is not None


def _openai(body: dict[str, Any], **top: Any) -> dict[str, Any]:
    base = {"model": "demo-lm", "messages": [{"role": "user", "content": SECRET}]}
    return {
        "custom_id": "o",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {**base, **body},
        **top,
    }


def _ours(body: Any = ML_BODY, **top: Any) -> bytes:
    return _raw({"custom_id": "a", "model": "demo-mlp", "body": body, **top})


BAD_TENSOR = {"dtype": "float32", "shape": [1, 3], "data": [1]}
IMAGE_PART = {"type": "image_url", "image_url": SECRET}
REFUSED: list[tuple[str, bytes, str]] = [
    ("empty", b"   ", "empty line"),
    ("not json", f"{{{SECRET}".encode(), "not UTF-8 JSON"),
    ("array", _raw([SECRET]), "JSON list where an object"),
    ("duplicate key", f'{{"custom_id": "a", "custom_id": "{SECRET}"}}'.encode(), "duplicate key"),
    ("no custom_id", _raw({"model": "demo-mlp", "body": ML_BODY, "x": SECRET}), "custom_id"),
    ("custom_id type", _raw({"custom_id": 5, "model": "demo-mlp", "body": ML_BODY}), "custom_id"),
    ("custom_id long", _ours(custom_id="c" * (MAX_CUSTOM_ID_CHARS + 1)), "longer"),
    ("bad model", _ours(model=f"Bad {SECRET}"), "model"),
    ("unknown field", _ours(**{SECRET: 1}), "unknown line field"),
    ("no body", _raw({"custom_id": "a", "model": "m"}), "body is missing"),
    ("kind", _ours({"kind": SECRET}), "body.kind"),
    ("sealed kind", _ours({"kind": "sealed"}), "body.kind"),
    ("bad tensor", _ours({"kind": "ml", "tensors": {SECRET: BAD_TENSOR}}), "invalid message"),
    (
        "chat role",
        _ours({"kind": "chat", "messages": [{"role": SECRET, "content": SECRET}]}),
        "invalid message",
    ),
    ("openai url", _raw(_openai({}, url=f"/v1/embeddings/{SECRET}")), "url must be"),
    ("openai method", _raw(_openai({}, method="GET")), "method must be"),
    ("openai stream", _raw(_openai({"stream": True})), "stream"),
    ("openai n", _raw(_openai({"n": 2})), "body.n"),
    ("openai known field", _raw(_openai({"logprobs": True})), "body.logprobs is not supported"),
    ("openai unknown field", _raw(_openai({SECRET: 1})), "unknown body field"),
    ("openai both maxes", _raw(_openai({"max_tokens": 1, "max_completion_tokens": 2})), "both"),
    (
        "openai image part",
        _raw(_openai({"messages": [{"role": "user", "content": [IMAGE_PART]}]})),
        "not text",
    ),
    ("openai no model", _raw({**_openai({}), "body": {"messages": []}}), "model"),
]


@pytest.mark.parametrize(("raw", "expected"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_lines_say_why_without_echoing_the_line(raw: bytes, expected: str) -> None:
    parsed = parse_line(12, raw)
    assert isinstance(parsed, InvalidLine)
    assert parsed.number == 12
    assert parsed.reason.startswith("line 12: ")
    assert expected in parsed.reason
    assert SECRET not in parsed.reason


def test_a_refused_line_keeps_its_custom_id_when_it_has_one() -> None:
    parsed = parse_line(1, _raw({"custom_id": "keep", "model": "m", "body": {"kind": "x"}}))
    assert isinstance(parsed, InvalidLine) and parsed.custom_id == "keep"


def test_a_repeated_custom_id_is_refused_after_its_first_line() -> None:
    parser = LineParser()
    line = _raw({"custom_id": "same", "model": "demo-mlp", "body": ML_BODY})
    assert isinstance(parser.parse(1, line), BatchLine)
    again = parser.parse(2, line)
    assert isinstance(again, InvalidLine) and "repeats line 1" in again.reason
    # Parsing is per file and deterministic: a fresh parser (a resumed run) says the same.
    other = LineParser()
    assert [type(other.parse(n, line)) for n in (1, 2)] == [BatchLine, InvalidLine]


def test_raw_lines_are_numbered_from_one_without_endings(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\n{"b": 2}\n{"c": 3}')
    assert list(iter_raw_lines(path)) == [
        (1, b'{"a": 1}'),
        (2, b""),
        (3, b'{"b": 2}'),
        (4, b'{"c": 3}'),
    ]
    path.write_bytes(b'{"a": 1}\n')
    assert list(iter_raw_lines(path)) == [(1, b'{"a": 1}')]
