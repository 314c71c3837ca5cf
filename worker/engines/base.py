"""The engine protocol: one loaded model that turns a request payload into an output.

Engines own their threading: ``run`` must never block the event loop (synchronous runtimes run
in an executor). Invalid input raises ``PermanentError`` with a message naming the problem but
not the data; transient failures raise ``RetryableError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from schemas.requests import ChatInput, MLInput
from schemas.results import ChatOutput, MLOutput, Usage

__all__ = ["Engine", "EngineResult"]


@dataclass(frozen=True)
class EngineResult:
    output: ChatOutput | MLOutput
    usage: Usage = field(default_factory=Usage)


@runtime_checkable
class Engine(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def model_digest(self) -> str:
        """Hex sha256 of the model artifact this engine runs."""
        ...

    async def run(self, payload: ChatInput | MLInput) -> EngineResult: ...

    async def close(self) -> None: ...
