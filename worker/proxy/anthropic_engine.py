"""Anthropic engine (official ``anthropic`` SDK, ``AsyncAnthropic``): the messages API.

``import anthropic`` here is the SDK, not this module (absolute imports; this module is only
ever ``worker.proxy.anthropic_engine``). SDK exceptions are translated into ``ProviderFailure`` at
this edge, dropping the exception (its text holds the provider's error body) with ``from None``.

Output rules: ``text`` is the concatenation of the answer's text blocks (thinking blocks are
the model's scratchpad, not its answer, and are left out). Tool calls keep Anthropic's
``tool_use`` ids and names, numbered in order of appearance; ``arguments`` is the JSON text
of the tool input as the provider delivered it: in a stream, the ``input_json_delta`` pieces
verbatim (``{}`` when there were none); in a plain answer the provider sends a parsed object,
which we write as ``json.dumps(input, separators=(",", ":"), ensure_ascii=False)``, keys in
the provider's order. Stop reasons: ``end_turn``/``stop_sequence`` → ``stop``,
``max_tokens``/``model_context_window_exceeded`` → ``length``, ``tool_use`` → ``tool_calls``,
``refusal`` → ``content_filter``; anything else (``pause_turn``) is an unusable answer.
Usage: input tokens include cache reads and writes (all of them went in).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anthropic
from pydantic import SecretStr

from schemas.requests import ChatInput
from schemas.results import FinishReason, Usage
from worker.proxy.assemble import OutputBuilder, bad_response
from worker.proxy.engine import ProxyEngine
from worker.proxy.errors import FailureKind, ProviderFailure, classify_status
from worker.proxy.translate import anthropic_messages_kwargs

__all__ = ["AnthropicEngine", "new_anthropic_client"]

_FINISH: dict[str | None, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_STREAM_ERRORS = {
    "rate_limit_error": FailureKind.RATE_LIMITED,
    "overloaded_error": FailureKind.SERVER,
    "api_error": FailureKind.SERVER,
    "invalid_request_error": FailureKind.INVALID,
}


def new_anthropic_client(base_url: str, api_key: SecretStr) -> anthropic.AsyncAnthropic:
    """The one client of an endpoint. SDK retries are off: ``worker.proxy.resilience`` runs
    ours. An explicit key and base URL mean the SDK consults no environment or profile."""
    return anthropic.AsyncAnthropic(
        api_key=api_key.get_secret_value(), base_url=base_url, max_retries=0
    )


def _stream_error(body: Any) -> ProviderFailure:
    """An ``error`` event inside a 200 stream: classified by its error type only."""
    kind = FailureKind.SERVER
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        kind = _STREAM_ERRORS.get(str(body["error"].get("type")), FailureKind.SERVER)
    return ProviderFailure(kind)


@asynccontextmanager
async def _translated_errors() -> AsyncIterator[None]:
    try:
        yield
    except anthropic.APIStatusError as e:
        if e.status_code < 400:
            raise _stream_error(e.body) from None
        raise classify_status(e.status_code, e.response.headers, e.body) from None
    except anthropic.APITimeoutError:
        raise ProviderFailure(FailureKind.TIMEOUT) from None
    except anthropic.APIConnectionError:
        raise ProviderFailure(FailureKind.CONNECTION) from None
    except anthropic.AnthropicError:
        raise ProviderFailure(FailureKind.BAD_RESPONSE) from None


def _finish(reason: str | None) -> FinishReason:
    finish = _FINISH.get(reason)
    if finish is None:
        raise bad_response()
    return finish


def _input_tokens(usage: Any) -> int:
    return int(
        (usage.input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0)
    )


class AnthropicEngine(ProxyEngine[anthropic.AsyncAnthropic]):
    def translate(self, payload: ChatInput) -> dict[str, Any]:
        return anthropic_messages_kwargs(payload, self.model)

    async def call(
        self,
        client: anthropic.AsyncAnthropic,
        kwargs: dict[str, Any],
        builder: OutputBuilder,
        *,
        stream: bool,
        timeout_s: float,
    ) -> tuple[FinishReason, Usage]:
        async with _translated_errors():
            if stream:
                return await self._stream(client, kwargs, builder, timeout_s)
            message = await client.messages.create(**kwargs, timeout=timeout_s)
            tools = 0
            for block in message.content:
                if block.type == "text":
                    await builder.text(block.text)
                elif block.type == "tool_use":
                    arguments = json.dumps(block.input, separators=(",", ":"), ensure_ascii=False)
                    await builder.tool(tools, id=block.id, name=block.name, arguments=arguments)
                    tools += 1
            usage = Usage(
                input_tokens=_input_tokens(message.usage),
                output_tokens=message.usage.output_tokens,
            )
            return _finish(message.stop_reason), usage

    async def _stream(
        self,
        client: anthropic.AsyncAnthropic,
        kwargs: dict[str, Any],
        builder: OutputBuilder,
        timeout_s: float,
    ) -> tuple[FinishReason, Usage]:
        events = await client.messages.create(**kwargs, stream=True, timeout=timeout_s)
        tool_of_block: dict[int, int] = {}
        reason: str | None = None
        input_tokens = output_tokens = 0
        finished = False
        async with events:
            async for event in events:
                if event.type == "message_start":
                    input_tokens = _input_tokens(event.message.usage)
                    output_tokens = event.message.usage.output_tokens
                elif event.type == "content_block_start":
                    block = event.content_block
                    if block.type == "text":
                        await builder.text(block.text)
                    elif block.type == "tool_use":
                        index = tool_of_block[event.index] = len(tool_of_block)
                        await builder.tool(index, id=block.id, name=block.name)
                elif event.type == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta":
                        await builder.text(delta.text)
                    elif delta.type == "input_json_delta" and event.index in tool_of_block:
                        await builder.tool(tool_of_block[event.index], arguments=delta.partial_json)
                elif event.type == "content_block_stop":
                    index_or_none = tool_of_block.get(event.index)
                    if index_or_none is not None and not builder.has_arguments(index_or_none):
                        await builder.tool(index_or_none, arguments="{}")
                elif event.type == "message_delta":
                    reason = event.delta.stop_reason or reason
                    output_tokens = event.usage.output_tokens
                    if event.usage.input_tokens is not None:
                        input_tokens = _input_tokens(event.usage)
                elif event.type == "message_stop":
                    finished = True
        if not finished:
            raise bad_response()  # the stream ended without its closing event
        return _finish(reason), Usage(input_tokens=input_tokens, output_tokens=output_tokens)
