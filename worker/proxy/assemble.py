"""Building the ``ChatOutput`` a client receives, streamed or not, from provider pieces.

Streamed answers are assembled from exactly the deltas that were emitted: the final text is
the concatenation of the emitted text pieces and each tool call's arguments the concatenation
of its argument pieces, so what the client reassembles from ``StreamChunk`` messages is, by
construction, what ``output_hash`` covers.

A provider answer we cannot represent (a tool name outside our schema, arguments over the size
limit) is a ``ProviderFailure`` of kind ``BAD_RESPONSE``: retried before anything was streamed,
a typed ``provider_error`` after.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from schemas.requests import FunctionCall, ToolCall, ToolCallDelta
from schemas.results import ChatOutput, FinishReason
from worker.engines.base import Delta, Emit
from worker.proxy.errors import FailureKind, ProviderFailure

__all__ = ["OutputBuilder", "bad_response"]


def bad_response() -> ProviderFailure:
    return ProviderFailure(FailureKind.BAD_RESPONSE)


@dataclass
class _Call:
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class OutputBuilder:
    """Collects text and tool-call pieces in order, emitting each as a ``Delta`` when
    ``emit`` is set. ``emitted`` says whether the client already holds part of the answer."""

    def __init__(self, emit: Emit | None = None) -> None:
        self._emit = emit
        self._text: list[str] = []
        self._calls: dict[int, _Call] = {}
        self.emitted = False

    async def text(self, piece: str) -> None:
        if not piece:
            return
        self._text.append(piece)
        if self._emit is not None:
            self.emitted = True
            await self._emit(Delta(text=piece))

    async def tool(
        self, index: int, *, id: str | None = None, name: str | None = None, arguments: str = ""
    ) -> None:
        call = self._calls.setdefault(index, _Call())
        if (id is not None and call.id not in (None, id)) or (
            name is not None and call.name not in (None, name)
        ):
            raise bad_response()  # a provider may name a call once, never rename it
        try:
            delta = ToolCallDelta(index=index, id=id, name=name, arguments=arguments)
        except ValidationError:
            raise bad_response() from None
        call.id = id if id is not None else call.id
        call.name = name if name is not None else call.name
        call.arguments += arguments
        if self._emit is not None and (id is not None or name is not None or arguments):
            self.emitted = True
            await self._emit(Delta(tool_calls=(delta,)))

    def has_arguments(self, index: int) -> bool:
        call = self._calls.get(index)
        return call is not None and call.arguments != ""

    def finish(self, finish_reason: FinishReason) -> ChatOutput:
        try:
            calls = [
                ToolCall(
                    id=c.id or "", function=FunctionCall(name=c.name or "", arguments=c.arguments)
                )
                for _, c in sorted(self._calls.items())
            ]
            return ChatOutput(
                text="".join(self._text), tool_calls=calls, finish_reason=finish_reason
            )
        except ValidationError:
            raise bad_response() from None
