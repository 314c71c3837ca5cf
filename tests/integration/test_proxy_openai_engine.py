"""OpenAI engines through the real ``openai`` SDK against a local server speaking its wire
format."""

from __future__ import annotations

import hashlib
import json

import pytest

from schemas.requests import (
    ChatInput,
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    SamplingParams,
    Tool,
    ToolCall,
)
from schemas.results import ChatOutput, ErrorCode, Usage
from tests.harness.providers import openai_wire as wire
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


async def test_chat_round_trip_strips_user_and_forwards_params() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(wire.chat_completion("Hello, Ada!", usage=(12, 4)))
        payload = _chat(
            user="client-identifier-42",
            params=SamplingParams(temperature=0.7, top_p=0.9, max_tokens=20, stop=["\n\n"], seed=7),
        )
        result = await loaded["m"].run(payload, RunContext(request_id="r1"))

    assert result.output == ChatOutput(text="Hello, Ada!", finish_reason="stop")
    assert result.usage == Usage(input_tokens=12, output_tokens=4)
    (request,) = server.requests
    assert request.path == "/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEYS['a']}"
    body = request.json
    assert body == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "Say hello to Ada"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_completion_tokens": 20,
        "stop": ["\n\n"],
        "seed": 7,
        "store": False,
    }
    assert b"client-identifier-42" not in request.body


async def test_tools_both_ways() -> None:
    """A request carrying tools, an earlier tool call and its result; the answer calls a tool."""
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(
            wire.chat_completion(
                None,
                tool_calls=[wire.tool_call("call_9", "get_weather", '{"city": "Oslo"}')],
                finish_reason="tool_calls",
            )
        )
        payload = ChatInput(
            messages=[
                ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="Weather in Paris, then Oslo?"),
                ChatMessage(
                    role="assistant",
                    tool_calls=[
                        ToolCall(
                            id="call_1",
                            function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'),
                        )
                    ],
                ),
                ChatMessage(role="tool", tool_call_id="call_1", content="sunny, 21C"),
            ],
            tools=[WEATHER],
            tool_choice="auto",
        )
        result = await loaded["m"].run(payload)

    assert result.output == ChatOutput(
        text="",
        tool_calls=[
            ToolCall(
                id="call_9", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}')
            )
        ],
        finish_reason="tool_calls",
    )
    body = server.requests[0].json
    assert body["messages"][2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    assert body["messages"][3] == {
        "role": "tool",
        "content": "sunny, 21C",
        "tool_call_id": "call_1",
    }
    assert body["tools"] == [WEATHER.model_dump(mode="json", exclude_none=True)]
    assert body["tool_choice"] == "auto"


async def test_json_schema_response_format_forwarded() -> None:
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
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(wire.chat_completion('{"n":3}'))
        result = await loaded["m"].run(payload)
    assert isinstance(result.output, ChatOutput) and json.loads(result.output.text) == {"n": 3}
    assert server.requests[0].json["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "num", "schema": schema, "strict": True},
    }


async def test_stream_deltas_concatenate_to_the_final_output() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(
            wire.chat_stream(
                ["Checking", " the ", "weather"],
                tool_pieces=[
                    (0, "call_a", "get_weather", ""),
                    (0, None, None, '{"ci'),
                    (0, None, None, 'ty":"Rome"}'),
                    (1, "call_b", "get_weather", '{"city":'),
                    (1, None, None, '"Nice"}'),
                ],
                finish_reason="tool_calls",
                usage=(30, 9),
            )
        )
        sink = Collector()
        result = await loaded["m"].run(_chat(tools=[WEATHER]), RunContext(emit=sink.emit))

    out = result.output
    assert isinstance(out, ChatOutput)
    assert out.text == sink.text == "Checking the weather"
    assert [c.function.arguments for c in out.tool_calls] == [
        sink.tool_arguments()[0],
        sink.tool_arguments()[1],
    ]
    assert [c.function.arguments for c in out.tool_calls] == ['{"city":"Rome"}', '{"city":"Nice"}']
    assert sink.tool_ids() == {0: ("call_a", "get_weather"), 1: ("call_b", "get_weather")}
    assert out.finish_reason == "tool_calls"
    assert result.usage == Usage(input_tokens=30, output_tokens=9)
    body = server.requests[0].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_refusal_maps_to_content_filter() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(wire.chat_completion(None, refusal="I can't help with that."))
        result = await loaded["m"].run(_chat())
    assert result.output == ChatOutput(
        text="I can't help with that.", finish_reason="content_filter"
    )


async def test_completions_round_trip_and_stream() -> None:
    async with ProviderServer() as server:
        settings = settings_for(
            Provider.OPENAI, [server.url], api="completions", api_model="gpt-instruct"
        )
        async with engines(settings) as loaded:
            server.enqueue(wire.completion(" world", finish_reason="length", usage=(2, 1)))
            plain = await loaded["m"].run(_chat("hello", user="u-1"))
            server.enqueue(wire.completion_stream([" wor", "ld"]))
            sink = Collector()
            streamed = await loaded["m"].run(_chat("hello"), RunContext(emit=sink.emit))

    assert plain.output == ChatOutput(text=" world", finish_reason="length")
    assert plain.usage == Usage(input_tokens=2, output_tokens=1)
    assert streamed.output == ChatOutput(text=" world", finish_reason="stop")
    assert sink.text == " world"
    first = server.requests[0]
    assert first.path == "/completions"
    assert first.json == {
        "model": "gpt-instruct",
        "prompt": "hello",
        "max_tokens": 64,
    }


async def test_completions_refuses_a_conversation_without_calling() -> None:
    async with ProviderServer() as server:
        settings = settings_for(Provider.OPENAI, [server.url], api="completions")
        async with engines(settings) as loaded:
            payload = ChatInput(
                messages=[
                    ChatMessage(role="system", content="x"),
                    ChatMessage(role="user", content="y"),
                ]
            )
            with pytest.raises(ProxyError) as caught:
                await loaded["m"].run(payload)
    assert caught.value.code is ErrorCode.INVALID_REQUEST and not caught.value.retryable
    assert server.requests == []


async def test_top_k_is_refused_not_dropped() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat(params=SamplingParams(top_k=5)))
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert "top_k" in caught.value.message
    assert server.requests == []


async def test_provider_400_is_invalid_request_without_the_body() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(wire.error(400, message="provider-secret-detail about Say hello"))
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat())
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert "secret" not in str(caught.value) and "hello" not in str(caught.value)
    assert len(server.requests) == 1  # the request's fault: not retried


async def test_content_policy_400_is_content_filtered() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url])) as loaded,
    ):
        server.enqueue(wire.error(400, code="content_policy_violation"))
        with pytest.raises(ProxyError) as caught:
            await loaded["m"].run(_chat())
    assert caught.value.code is ErrorCode.CONTENT_FILTERED


async def test_model_digest_names_provider_and_model() -> None:
    async with (
        ProviderServer() as server,
        engines(settings_for(Provider.OPENAI, [server.url], api_model="gpt-4o-mini")) as loaded,
    ):
        digest = loaded["m"].model_digest
    assert digest == hashlib.sha256(b"openai:gpt-4o-mini").hexdigest()
