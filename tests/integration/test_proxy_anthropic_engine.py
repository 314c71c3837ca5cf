"""The Anthropic engine through the real ``anthropic`` SDK against a local server speaking the
messages wire format (API 2026-10-21)."""

from __future__ import annotations

import pytest

from schemas.requests import (
    ChatInput,
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    NamedToolChoice,
    SamplingParams,
    Tool,
    ToolCall,
)
from schemas.results import ChatOutput, ErrorCode, Usage
from tests.harness.providers import anthropic_wire as wire
from tests.harness.providers.helpers import KEYS, Collector, engines, settings_for
from tests.harness.providers.server import ProviderServer
from worker.engines.base import RunContext
from worker.proxy.errors import ProxyError
from worker.proxy.settings import Provider

WEATHER = Tool(
    function=FunctionSpec(
        name="get_weather",
        description="Current weather",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
)


def _chat(text: str = "Say hello to Ada", **kw: object) -> ChatInput:
    return ChatInput(messages=[ChatMessage(role="user", content=text)], **kw)  # type: ignore[arg-type]


async def test_messages_round_trip_strips_user() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(
            wire.message(
                [wire.text_block("Hello, "), wire.text_block("Ada!")],
                stop_reason="stop_sequence",
                usage=(10, 3),
                cache_read=5,
            )
        )
        payload = ChatInput(
            messages=[
                ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="system", content="Be kind."),
                ChatMessage(role="user", content="Say hello to Ada"),
            ],
            params=SamplingParams(max_tokens=30, stop=["END"]),
            user="client-identifier-42",
        )
        result = await loaded["m"].run(payload, RunContext(request_id="r1"))

    assert result.output == ChatOutput(text="Hello, Ada!", finish_reason="stop")
    assert result.usage == Usage(input_tokens=15, output_tokens=3)
    (request,) = server.requests
    assert request.path == "/v1/messages"
    assert request.headers["authorization"] == f"Bearer {KEYS['a']}"
    assert request.json == {
        "model": "claude-test",
        "max_tokens": 30,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [{"role": "user", "content": "Say hello to Ada"}],
        "stop_sequences": ["END"],
    }
    assert b"client-identifier-42" not in request.body
    assert b"metadata" not in request.body


async def test_tools_both_ways() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(
            wire.message(
                [
                    wire.text_block("Let me check."),
                    wire.tool_use_block("toolu_2", "get_weather", {"city": "Oslo", "unit": "C"}),
                ],
                stop_reason="tool_use",
            )
        )
        payload = ChatInput(
            messages=[
                ChatMessage(role="user", content="Weather in Paris and Rome, then Oslo?"),
                ChatMessage(
                    role="assistant",
                    content="Checking.",
                    tool_calls=[
                        ToolCall(
                            id="toolu_a",
                            function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'),
                        ),
                        ToolCall(
                            id="toolu_b",
                            function=FunctionCall(name="get_weather", arguments='{"city":"Rome"}'),
                        ),
                    ],
                ),
                ChatMessage(role="tool", tool_call_id="toolu_a", content="sunny"),
                ChatMessage(role="tool", tool_call_id="toolu_b", content="rain"),
                ChatMessage(role="user", content="And Oslo?"),
            ],
            tools=[WEATHER],
            tool_choice=NamedToolChoice.model_validate({"function": {"name": "get_weather"}}),
        )
        result = await loaded["m"].run(payload)

    assert result.output == ChatOutput(
        text="Let me check.",
        tool_calls=[
            ToolCall(
                id="toolu_2",
                function=FunctionCall(name="get_weather", arguments='{"city":"Oslo","unit":"C"}'),
            )
        ],
        finish_reason="tool_calls",
    )
    body = server.requests[0].json
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome, then Oslo?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_a",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_b",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "rain"},
                {"type": "text", "text": "And Oslo?"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather"}


@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", "auto"), ("required", "any"), ("none", "none")]
)
async def test_tool_choice_mapping(choice: str, expected: str) -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(wire.message())
        await loaded["m"].run(_chat(tools=[WEATHER], tool_choice=choice))
    assert server.requests[0].json["tool_choice"] == {"type": expected}


async def test_json_schema_becomes_structured_output() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    payload = ChatInput.model_validate(
        {
            "messages": [{"role": "user", "content": "a number"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "num", "schema": schema, "strict": True},
            },
        }
    )
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(wire.message([wire.text_block('{"n":4}')]))
        result = await loaded["m"].run(payload)
    assert result.output == ChatOutput(text='{"n":4}', finish_reason="stop")
    assert server.requests[0].json["output_config"] == {
        "format": {"type": "json_schema", "schema": schema}
    }


async def test_stream_deltas_concatenate_to_the_final_output() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(
            wire.message_stream(
                [
                    ("thinking", ["hmm, private scratchpad"]),
                    ("text", ["Checking", " both", "."]),
                    ("tool_use", ("toolu_1", "get_weather", ['{"city"', ': "Rome"}'])),
                    ("tool_use", ("toolu_2", "get_weather", [])),
                ],
                stop_reason="tool_use",
                usage=(21, 8),
            )
        )
        sink = Collector()
        result = await loaded["m"].run(_chat(tools=[WEATHER]), RunContext(emit=sink.emit))

    out = result.output
    assert isinstance(out, ChatOutput)
    assert out.text == sink.text == "Checking both."
    args = sink.tool_arguments()
    assert [c.function.arguments for c in out.tool_calls] == [args[0], args[1]]
    assert args == {0: '{"city": "Rome"}', 1: "{}"}
    assert [c.id for c in out.tool_calls] == ["toolu_1", "toolu_2"]
    assert sink.tool_ids() == {0: ("toolu_1", "get_weather"), 1: ("toolu_2", "get_weather")}
    assert out.finish_reason == "tool_calls"
    assert result.usage == Usage(input_tokens=21, output_tokens=8)
    assert server.requests[0].json["stream"] is True


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("refusal", "content_filter"),
    ],
)
async def test_stop_reason_mapping(stop_reason: str, finish: str) -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(wire.message(stop_reason=stop_reason))
        result = await loaded["m"].run(_chat())
    assert isinstance(result.output, ChatOutput) and result.output.finish_reason == finish


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        (_chat(params=SamplingParams(seed=3)), "seed"),
        (_chat(params=SamplingParams(top_k=3)), "top_k"),
        (_chat(params=SamplingParams(top_p=0.5)), "top_p"),
        (_chat(params=SamplingParams(temperature=0.7)), "temperature"),
        (ChatInput(messages=[ChatMessage(role="user", content="x", name="bob")]), "names"),
        (
            ChatInput.model_validate(
                {
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "json_object"},
                }
            ),
            "json_object",
        ),
    ],
)
async def test_unsupported_features_are_refused_before_any_call(
    payload: ChatInput, word: str
) -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(payload)
    assert caught.value.code is ErrorCode.INVALID_REQUEST and not caught.value.retryable
    assert word in caught.value.message
    assert server.requests == []


async def test_max_tokens_above_cap_is_refused() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url], max_tokens_cap=16)) as loaded,
    ):
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat(params=SamplingParams(max_tokens=17)))
        server.enqueue(wire.message())
        await loaded["m"].run(_chat(params=SamplingParams(max_tokens=16)))
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert len(server.requests) == 1


async def test_stream_error_after_first_piece_is_not_retried() -> None:
    """Once a piece reached the client a retry would repeat it: the error is final."""
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(wire.message_stream([("text", ["Hel", "lo"])], error_after=4))
        sink = Collector()
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat(), RunContext(emit=sink.emit))
    assert sink.text == "Hel"
    assert caught.value.code is ErrorCode.PROVIDER_ERROR and caught.value.retryable
    assert len(server.requests) == 1


async def test_stream_error_before_any_piece_is_retried() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.ANTHROPIC, [server.url])) as loaded,
    ):
        server.enqueue(
            wire.message_stream([("text", ["Hel", "lo"])], error_after=2),
            wire.message_stream([("text", ["Hel", "lo"])]),
        )
        sink = Collector()
        result = await loaded["m"].run(_chat(), RunContext(emit=sink.emit))
    assert result.output == ChatOutput(text="Hello", finish_reason="stop") and sink.text == "Hello"
    assert len(server.requests) == 2
