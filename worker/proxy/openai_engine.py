"""OpenAI engines (official ``openai`` SDK, ``AsyncOpenAI``): chat completions and the legacy
completions endpoint.

``import openai`` here is the SDK, not this module: with absolute imports this module is only
ever ``worker.proxy.openai_engine``. SDK exceptions are translated into ``ProviderFailure`` at this
edge, dropping the exception (its text holds the provider's error body) with ``from None``.

Output rules: ``text`` is the message content (or the model's refusal, with finish reason
``content_filter``); tool-call ids, names and ``arguments`` are OpenAI's, verbatim.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
from pydantic import SecretStr

from schemas.requests import ChatInput
from schemas.results import FinishReason, Usage
from worker.proxy.assemble import OutputBuilder, bad_response
from worker.proxy.engine import ProxyEngine
from worker.proxy.errors import FailureKind, ProviderFailure, classify_status
from worker.proxy.translate import openai_chat_kwargs, openai_completions_kwargs

__all__ = ["OpenAIChatEngine", "OpenAICompletionsEngine", "new_openai_client"]

_FINISH: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def new_openai_client(base_url: str, api_key: SecretStr) -> openai.AsyncOpenAI:
    """The one client of an endpoint. SDK retries are off: ``worker.proxy.resilience`` runs
    ours. The base URL is always explicit, so ``OPENAI_BASE_URL`` never redirects calls."""
    return openai.AsyncOpenAI(api_key=api_key.get_secret_value(), base_url=base_url, max_retries=0)


@asynccontextmanager
async def _translated_errors() -> AsyncIterator[None]:
    try:
        yield
    except openai.APIStatusError as e:
        raise classify_status(e.status_code, e.response.headers, e.body) from None
    except openai.APITimeoutError:
        raise ProviderFailure(FailureKind.TIMEOUT) from None
    except openai.APIConnectionError:
        raise ProviderFailure(FailureKind.CONNECTION) from None
    except openai.OpenAIError:
        raise ProviderFailure(FailureKind.BAD_RESPONSE) from None


def _finish(reason: str | None, refused: bool) -> FinishReason:
    if refused:
        return "content_filter"
    finish = _FINISH.get(reason)
    if finish is None:
        raise bad_response()
    return finish


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    return Usage(input_tokens=usage.prompt_tokens or 0, output_tokens=usage.completion_tokens or 0)


class OpenAIChatEngine(ProxyEngine[openai.AsyncOpenAI]):
    """``chat.completions.create``; streamed with ``include_usage`` so usage is still signed."""

    def translate(self, payload: ChatInput) -> dict[str, Any]:
        return openai_chat_kwargs(payload, self.model)

    async def call(
        self,
        client: openai.AsyncOpenAI,
        kwargs: dict[str, Any],
        builder: OutputBuilder,
        *,
        stream: bool,
        timeout_s: float,
    ) -> tuple[FinishReason, Usage]:
        async with _translated_errors():
            if stream:
                return await self._stream(client, kwargs, builder, timeout_s)
            response = await client.chat.completions.create(**kwargs, timeout=timeout_s)
            if not response.choices:
                raise bad_response()
            choice = response.choices[0]
            message = choice.message
            refused = message.refusal is not None and not message.content
            await builder.text(message.refusal if refused and message.refusal else "")
            await builder.text(message.content or "")
            for index, call in enumerate(message.tool_calls or ()):
                function = getattr(call, "function", None)
                if function is None:
                    raise bad_response()  # a custom (non-function) tool call we never asked for
                await builder.tool(
                    index, id=call.id, name=function.name, arguments=function.arguments
                )
            return _finish(choice.finish_reason, refused), _usage(response.usage)

    async def _stream(
        self,
        client: openai.AsyncOpenAI,
        kwargs: dict[str, Any],
        builder: OutputBuilder,
        timeout_s: float,
    ) -> tuple[FinishReason, Usage]:
        events = await client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, timeout=timeout_s
        )
        reason: str | None = None
        refused = False
        usage = Usage()
        async with events:
            async for chunk in events:
                if chunk.usage is not None:
                    usage = _usage(chunk.usage)
                for choice in chunk.choices[:1]:
                    delta = choice.delta
                    if delta.refusal:
                        refused = True
                        await builder.text(delta.refusal)
                    await builder.text(delta.content or "")
                    for call in delta.tool_calls or ():
                        function = call.function
                        await builder.tool(
                            call.index,
                            id=call.id,
                            name=function.name if function else None,
                            arguments=(function.arguments or "") if function else "",
                        )
                    reason = choice.finish_reason or reason
        return _finish(reason, refused), usage


class OpenAICompletionsEngine(ProxyEngine[openai.AsyncOpenAI]):
    """The legacy ``completions.create`` endpoint (instruct models): one prompt, text out."""

    def translate(self, payload: ChatInput) -> dict[str, Any]:
        return openai_completions_kwargs(payload, self.model)

    async def call(
        self,
        client: openai.AsyncOpenAI,
        kwargs: dict[str, Any],
        builder: OutputBuilder,
        *,
        stream: bool,
        timeout_s: float,
    ) -> tuple[FinishReason, Usage]:
        async with _translated_errors():
            if not stream:
                response = await client.completions.create(**kwargs, timeout=timeout_s)
                if not response.choices:
                    raise bad_response()
                await builder.text(response.choices[0].text)
                return _finish(response.choices[0].finish_reason, False), _usage(response.usage)
            events = await client.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}, timeout=timeout_s
            )
            reason: str | None = None
            usage = Usage()
            async with events:
                async for chunk in events:
                    if chunk.usage is not None:
                        usage = _usage(chunk.usage)
                    for choice in chunk.choices[:1]:
                        await builder.text(choice.text)
                        reason = choice.finish_reason or reason
            return _finish(reason, False), usage
