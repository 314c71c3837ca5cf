"""Reassembling stream chunks (``StreamChunk``) into the text and tool calls they carry.

Chunks are unsigned; the final result is. ``check_stream`` tells whether what a client showed
from the chunks is exactly what the signed result commits to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.results import ChatOutput, StreamChunk

__all__ = ["Reassembled", "check_stream", "reassemble"]


@dataclass
class _Call:
    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reassembled:
    text: str
    tool_calls: list[tuple[str | None, str | None, str]]
    """(id, name, arguments) per tool-call index, in index order."""
    complete: bool
    """False when a chunk index is missing (a lost chunk)."""


def reassemble(chunks: Iterable[StreamChunk]) -> Reassembled:
    ordered = sorted({c.index: c for c in chunks}.values(), key=lambda c: c.index)
    complete = [c.index for c in ordered] == list(range(len(ordered)))
    calls: dict[int, _Call] = {}
    for chunk in ordered:
        for delta in chunk.tool_calls:
            call = calls.setdefault(delta.index, _Call())
            call.id = call.id or delta.id
            call.name = call.name or delta.name
            call.arguments.append(delta.arguments)
    return Reassembled(
        text="".join(c.text for c in ordered),
        tool_calls=[(c.id, c.name, "".join(c.arguments)) for _, c in sorted(calls.items())],
        complete=complete,
    )


def check_stream(chunks: Iterable[StreamChunk], final: ChatOutput) -> bool:
    """True when the chunks reassemble to exactly the final output's text and tool calls."""
    got = reassemble(chunks)
    want = [(c.id, c.function.name, c.function.arguments) for c in final.tool_calls]
    return got.complete and got.text == final.text and got.tool_calls == want
