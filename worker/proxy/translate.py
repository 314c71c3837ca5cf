"""Translating our one client request format (OpenAI-style ``ChatInput``) to each provider.

Rules (see ``docs/PROXY.md``):

- everything the provider's API supports is forwarded; anything it cannot honour is refused
  with a typed ``invalid_request`` before any call, never silently dropped;
- ``user`` (and any other client identifier, e.g. Anthropic's ``metadata.user_id``) is never
  sent: providers see the node, not the client;
- OpenAI calls are sent with ``store: false`` so the provider keeps no copy for later use;
- ``max_tokens`` above the model's configured cap is refused, not lowered.

The functions return plain keyword dicts for the SDK calls; they do no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from schemas.requests import ChatInput, ChatMessage, NamedToolChoice
from worker.proxy.errors import invalid_request
from worker.proxy.settings import ProxiedModel

__all__ = ["anthropic_messages_kwargs", "openai_chat_kwargs", "openai_completions_kwargs"]


def _check_common(payload: ChatInput, model: ProxiedModel) -> None:
    cap = model.max_tokens_cap
    if cap is not None and payload.params.max_tokens > cap:
        raise invalid_request(f"max_tokens above this model's cap of {cap}")


# --- OpenAI chat completions -------------------------------------------------------------------


def _openai_message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [c.model_dump(mode="json") for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _set_sampling(payload: ChatInput) -> dict[str, float]:
    """Only the sampling values the client set: unset ones stay the provider's default."""
    params = payload.params
    values = {"temperature": params.temperature, "top_p": params.top_p}
    return {k: v for k, v in values.items() if v is not None}


def openai_chat_kwargs(payload: ChatInput, model: ProxiedModel) -> dict[str, Any]:
    """Keyword arguments for ``AsyncOpenAI().chat.completions.create`` (without ``stream``)."""
    _check_common(payload, model)
    params = payload.params
    if params.top_k is not None:
        raise invalid_request("top_k is not supported by openai")
    kwargs: dict[str, Any] = {
        "model": model.api_model,
        "messages": [_openai_message(m) for m in payload.messages],
        "max_completion_tokens": params.max_tokens,
        "store": False,
        **_set_sampling(payload),
    }
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.seed is not None:
        kwargs["seed"] = params.seed
    if payload.tools:
        kwargs["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in payload.tools]
    if payload.tool_choice is not None:
        choice = payload.tool_choice
        kwargs["tool_choice"] = (
            choice.model_dump(mode="json") if isinstance(choice, NamedToolChoice) else choice
        )
    if payload.response_format is not None:
        kwargs["response_format"] = payload.response_format.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
    return kwargs


# --- OpenAI legacy completions -----------------------------------------------------------------


def openai_completions_kwargs(payload: ChatInput, model: ProxiedModel) -> dict[str, Any]:
    """Keyword arguments for ``AsyncOpenAI().completions.create``: only a conversation that is
    one plain user message maps to a prompt; tools and response formats do not exist there."""
    _check_common(payload, model)
    params = payload.params
    if len(payload.messages) != 1 or payload.messages[0].role != "user":
        raise invalid_request("the completions api takes exactly one user message (the prompt)")
    message = payload.messages[0]
    if message.name is not None:
        raise invalid_request("the completions api has no message names")
    if payload.tools or payload.tool_choice not in (None, "none"):
        raise invalid_request("the completions api has no tools")
    if payload.response_format is not None and payload.response_format.type != "text":
        raise invalid_request("the completions api has no response_format")
    if params.top_k is not None:
        raise invalid_request("top_k is not supported by openai")
    kwargs: dict[str, Any] = {
        "model": model.api_model,
        "prompt": message.content or "",
        "max_tokens": params.max_tokens,
        **_set_sampling(payload),
    }
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.seed is not None:
        kwargs["seed"] = params.seed
    return kwargs


# --- Anthropic messages ------------------------------------------------------------------------

_ANTHROPIC_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise invalid_request("assistant tool call arguments must be a JSON object for anthropic")
    return value


def _anthropic_turns(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(system blocks, messages). Leading system messages become the ``system`` prompt (one
    text block each); a system message later in the conversation stays in place (API
    2026-10-21 accepts ``role: system`` turns). Tool results become ``tool_result`` blocks of
    a user turn, which also takes a user message that directly follows them."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    leading = True
    for m in messages:
        if m.name is not None:
            raise invalid_request("message names are not supported by anthropic")
        if m.role == "system":
            block = {"type": "text", "text": m.content or ""}
            if leading:
                system.append(block)
            else:
                turns.append({"role": "system", "content": m.content or ""})
            continue
        leading = False
        if m.role == "tool":
            result = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}
            _append_user_blocks(turns, [result])
        elif m.role == "user":
            if turns and turns[-1].get("_tool_results"):
                _append_user_blocks(turns, [{"type": "text", "text": m.content or ""}])
            else:
                turns.append({"role": "user", "content": m.content or ""})
        else:
            blocks: list[dict[str, Any]] = []
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            for call in m.tool_calls or ():
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.function.name,
                        "input": _tool_input(call.function.arguments),
                    }
                )
            content: Any = blocks if m.tool_calls else (m.content or "")
            turns.append({"role": "assistant", "content": content})
    for turn in turns:
        turn.pop("_tool_results", None)
    return system, turns


def _append_user_blocks(turns: list[dict[str, Any]], blocks: list[dict[str, Any]]) -> None:
    """Extend the user turn holding tool results, or start one (marked until the end)."""
    last = turns[-1] if turns else None
    if last is not None and last.get("_tool_results"):
        last["content"].extend(blocks)
    else:
        turns.append({"role": "user", "content": list(blocks), "_tool_results": True})


def anthropic_messages_kwargs(payload: ChatInput, model: ProxiedModel) -> dict[str, Any]:
    """Keyword arguments for ``AsyncAnthropic().messages.create`` (without ``stream``).

    API 2026-10-21 (SDK 2.x) has no sampling controls: a request that sets ``seed``,
    ``top_k``, ``top_p`` or ``temperature`` is refused; left unset, the provider samples as
    it does by default (documented in docs/PROXY.md)."""
    _check_common(payload, model)
    params = payload.params
    if params.seed is not None:
        raise invalid_request("seed is not supported by anthropic")
    if params.top_k is not None:
        raise invalid_request("top_k is not supported by anthropic (api 2026-10-21)")
    if params.top_p is not None:
        raise invalid_request("top_p is not supported by anthropic (api 2026-10-21)")
    if params.temperature is not None:
        raise invalid_request("temperature is not supported by anthropic (api 2026-10-21)")
    system, turns = _anthropic_turns(payload.messages)
    kwargs: dict[str, Any] = {
        "model": model.api_model,
        "messages": turns,
        "max_tokens": params.max_tokens,
    }
    if system:
        kwargs["system"] = system
    if params.stop:
        kwargs["stop_sequences"] = list(params.stop)
    if payload.tools:
        tools = []
        for tool in payload.tools:
            spec = tool.function
            entry: dict[str, Any] = {
                "name": spec.name,
                "input_schema": spec.parameters or {"type": "object", "properties": {}},
            }
            if spec.description is not None:
                entry["description"] = spec.description
            if spec.strict is not None:
                entry["strict"] = spec.strict
            tools.append(entry)
        kwargs["tools"] = tools
    choice = payload.tool_choice
    if isinstance(choice, NamedToolChoice):
        kwargs["tool_choice"] = {"type": "tool", "name": choice.function.name}
    elif choice is not None and payload.tools:
        kwargs["tool_choice"] = {"type": _ANTHROPIC_TOOL_CHOICE[choice]}
    fmt = payload.response_format
    if fmt is not None and fmt.type == "json_object":
        raise invalid_request("response_format json_object is not supported by anthropic")
    if fmt is not None and fmt.type == "json_schema":
        spec_format = fmt.json_schema
        if spec_format.description is not None:
            raise invalid_request("a json_schema description is not supported by anthropic")
        kwargs["output_config"] = {"format": {"type": "json_schema", "schema": spec_format.schema_}}
    return kwargs
