"""The engine protocol: one loaded model that turns a request payload into an output.

Engines own their threading: ``run`` must never block the event loop (synchronous runtimes run
in an executor). Invalid input raises ``PermanentError`` with a message naming the problem but
not the data; transient failures raise ``RetryableError``.

Streaming: when ``RunContext.emit`` is set (the request asked for ``stream``), an engine that
can stream calls it with each ``Delta`` in order as it generates; engines that cannot simply
ignore it. The deltas must concatenate to exactly the final ``ChatOutput`` (text, and tool-call
arguments per index), because the signed result is what the client checks them against.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from schemas.requests import ChatInput, MLInput, ToolCallDelta
from schemas.results import ChatOutput, MLOutput, Usage

__all__ = ["Delta", "Emit", "Engine", "EngineResult", "RunContext"]


@dataclass(frozen=True)
class EngineResult:
    output: ChatOutput | MLOutput
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Delta:
    """The next piece of a streamed chat answer."""

    text: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


Emit = Callable[[Delta], Awaitable[None]]


@dataclass(frozen=True)
class RunContext:
    """Per-request facts an engine may use; never logged with the payload."""

    request_id: str = ""
    deadline_unix_ms: int | None = None
    """Absolute wall-clock deadline: engines that call out (providers) bound their timeout."""
    emit: Emit | None = None
    """Set only for streamed requests."""


@runtime_checkable
class Engine(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def model_digest(self) -> str:
        """Hex sha256 of the model artifact this engine runs (for proxied models: of the
        provider and model name, see ``docs/PROTOCOL.md``)."""
        ...

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult: ...

    async def close(self) -> None: ...
