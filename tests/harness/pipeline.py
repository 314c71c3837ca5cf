"""An in-test engine and a chat request for tests of the pipeline and its verification modes
(plain, sealed, TEE), all on one fixed clock and one signer."""

from __future__ import annotations

from collections.abc import Callable

from schemas.requests import ChatInput, ChatMessage, InferenceRequest, MLInput, input_hash
from schemas.results import ChatOutput, Usage
from schemas.signing import ChainSigner, Signer
from schemas.verify.payer import request_grant, sign_grant
from worker.engines import EngineResult
from worker.engines.base import RunContext

__all__ = [
    "CHAIN_SIGNER",
    "DIGEST",
    "NOW_MS",
    "OUTPUT",
    "PAYER",
    "SECRET",
    "SIGNER",
    "USAGE",
    "ScriptedEngine",
    "chat_request",
]

NOW_MS = 1_700_000_000_000
"""The pipeline's clock in these tests."""
DIGEST = "ab" * 32
"""The model digest ``ScriptedEngine`` reports."""
SECRET = "secret prompt text"
"""The user's prompt in ``chat_request``: tests search logs and replies for it."""
SIGNER = Signer(bytes(32))
PAYER = Signer(b"\x0b" * 32)
"""The payer of ``chat_request``: its ledger account is ``ed25519:<node id>``."""
CHAIN_SIGNER = ChainSigner(b"\x07" * 32)
"""The node's chain account (secp256k1) in these tests."""

OUTPUT = ChatOutput(text="hello back", finish_reason="stop")
USAGE = Usage(input_tokens=7, output_tokens=3)


class ScriptedEngine:
    """An ``Engine`` that raises the scripted exceptions in turn, then answers ``result``."""

    def __init__(
        self,
        failures: list[BaseException] | Callable[[], BaseException] | None = None,
        result: EngineResult | None = None,
        name: str = "demo-lm",
    ) -> None:
        self._failures = [] if failures is None else failures
        self._result = result or EngineResult(output=OUTPUT, usage=USAGE)
        self._name = name
        self.calls: list[ChatInput | MLInput] = []

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def model_digest(self) -> str:
        return DIGEST

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        self.calls.append(payload)
        if callable(self._failures):
            raise self._failures()
        if len(self.calls) <= len(self._failures):
            raise self._failures[len(self.calls) - 1]
        return self._result

    async def close(self) -> None:
        return None


def chat_request(**overrides: object) -> InferenceRequest:
    """A chat request for ``demo-lm`` carrying ``SECRET``, paid for by ``PAYER`` (a signed
    grant); ``overrides`` replace fields (``model``, ``mode``, ...), and ``payer`` may name
    another key that signs (a ``Signer`` or ``ChainSigner``) or None (no payer)."""
    payer = overrides.pop("payer", PAYER)
    fields: dict[str, object] = {
        "request_id": "req-p-1",
        "model": "demo-lm",
        "created_unix_ms": NOW_MS - 100,
        "payload": ChatInput(messages=[ChatMessage(role="user", content=SECRET)]),
    }
    fields.update(overrides)
    request = InferenceRequest.model_validate(fields)
    if payer is None:
        return request
    assert isinstance(payer, Signer | ChainSigner)
    payload = request.payload
    assert isinstance(payload, ChatInput | MLInput)
    grant = request_grant(request, payload, input_hash(payload))
    return request.model_copy(update={"payer": sign_grant(grant, payer)})
