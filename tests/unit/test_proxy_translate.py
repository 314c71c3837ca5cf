"""Request translation edge cases (pure: no I/O). Round trips through the SDKs live in
tests/integration/test_proxy_openai_engine.py and test_proxy_anthropic_engine.py."""

from __future__ import annotations

import pytest

from schemas.requests import ChatInput
from schemas.results import ErrorCode
from worker.proxy.errors import ProxyError
from worker.proxy.settings import ProxiedModel
from worker.proxy.translate import anthropic_messages_kwargs, openai_chat_kwargs

CLAUDE = ProxiedModel(name="c", provider="anthropic", api_model="claude-x", endpoints=["e"])  # type: ignore[arg-type]
GPT = ProxiedModel(name="g", provider="openai", api_model="gpt-x", endpoints=["e"])  # type: ignore[arg-type]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _payload(**fields: object) -> ChatInput:
    return ChatInput.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_anthropic_keeps_a_later_system_message_in_place() -> None:
    payload = ChatInput.model_validate(
        {
            "messages": [
                {"role": "system", "content": "rules"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "system", "content": "new rules"},
                {"role": "user", "content": "again"},
            ]
        }
    )
    kwargs = anthropic_messages_kwargs(payload, CLAUDE)
    assert kwargs["system"] == [{"type": "text", "text": "rules"}]
    assert kwargs["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "new rules"},
        {"role": "user", "content": "again"},
    ]


def test_anthropic_refuses_tool_arguments_that_are_not_an_object() -> None:
    payload = ChatInput.model_validate(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "t1", "function": {"name": "f", "arguments": "[1]"}}],
                },
            ]
        }
    )
    with pytest.raises(ProxyError) as caught:
        anthropic_messages_kwargs(payload, CLAUDE)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_anthropic_tool_without_parameters_gets_an_empty_object_schema() -> None:
    bare = {"type": "function", "function": {"name": "now", "strict": True}}
    kwargs = anthropic_messages_kwargs(_payload(tools=[bare]), CLAUDE)
    assert kwargs["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}, "strict": True}
    ]


def test_anthropic_tool_choice_none_without_tools_is_omitted() -> None:
    assert "tool_choice" not in anthropic_messages_kwargs(_payload(tool_choice="none"), CLAUDE)


def test_anthropic_refuses_a_json_schema_description() -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "n", "description": "a number", "schema": {"type": "object"}},
    }
    with pytest.raises(ProxyError, match="description"):
        anthropic_messages_kwargs(_payload(response_format=fmt), CLAUDE)


def test_openai_named_tool_choice_and_json_object() -> None:
    kwargs = openai_chat_kwargs(
        _payload(
            tools=[TOOL],
            tool_choice={"type": "function", "function": {"name": "f"}},
            response_format={"type": "json_object"},
            user="someone",
        ),
        GPT,
    )
    assert kwargs["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert kwargs["response_format"] == {"type": "json_object"}
    assert kwargs["tools"] == [TOOL]
    assert "user" not in kwargs and "metadata" not in kwargs and "safety_identifier" not in kwargs


def test_no_client_identifier_reaches_either_provider() -> None:
    payload = _payload(user="client-42")
    for kwargs in (openai_chat_kwargs(payload, GPT), anthropic_messages_kwargs(payload, CLAUDE)):
        assert "client-42" not in repr(kwargs)
