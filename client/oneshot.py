"""One request, end to end, as ``inference-node request`` sends it: build (optionally signed
by a payer and sealed), send, await the verified reply, and report every check.

``InferenceClient`` resolves a request only with a reply that verifies; the report repeats the
checks so a caller can show them (and a result that needed a TEE shows its attestation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.requests import build_request
from client.settings import ClientSettings
from client.transport import ChunkCallback, InferenceClient, Terminal
from schemas.base import SettlementMode, VerificationMode
from schemas.requests import ChatInput, InferenceRequest, MLInput
from schemas.results import InferenceResult
from schemas.signing import ChainSigner, Signer
from schemas.topics import Topics
from schemas.verify.result import VerificationReport, verify_error, verify_result

__all__ = ["OneShot", "load_payer_key", "request_once"]


@dataclass(frozen=True)
class OneShot:
    request: InferenceRequest
    """The request as built (before sealing): what ``verify --request`` checks against."""
    reply: Terminal
    """The verified reply (a sealed one opened)."""
    report: VerificationReport
    plaintext: ChatInput | MLInput | None = None


def load_payer_key(path: Path) -> Signer | ChainSigner:
    """A payer key file: ``ed25519:<hex seed>`` or ``secp256k1:<hex key>``."""
    scheme, _, key = path.read_text().strip().partition(":")
    if scheme == "ed25519":
        return Signer(bytes.fromhex(key))
    if scheme == "secp256k1":
        return ChainSigner(bytes.fromhex(key.removeprefix("0x")))
    raise ValueError("a payer key file holds ed25519:<hex> or secp256k1:<hex>")


async def request_once(
    settings: ClientSettings,
    model: str,
    payload: ChatInput | MLInput,
    *,
    timeout_s: float,
    deadline_s: float | None = None,
    mode: VerificationMode = VerificationMode.VANILLA,
    settlement: SettlementMode = SettlementMode.BATCH,
    payer_key: Signer | ChainSigner | None = None,
    sealed: bool = False,
    stream: bool = False,
    on_chunk: ChunkCallback | None = None,
) -> OneShot:
    """Raises ``ReplyTimeout`` (no verified reply in time), ``NoActiveNodes`` (nothing to seal
    to) or ``TrustUnavailable`` (admission facts unavailable)."""
    request = build_request(
        model,
        payload,
        deadline_s=deadline_s,
        payer_key=payer_key,
        reply_to=settings.reply_to,
        mode=mode,
        settlement=settlement,
        stream=stream,
    )
    async with InferenceClient(
        settings.kafka,
        Topics(settings.namespace),
        settings.reply_to,
        admission=settings.admission,
        attestation=settings.attestation,
        seal_to_attested_only=settings.seal_to_attested_only,
    ) as client:
        if sealed:
            sealed_request, reply = await client.request_sealed(
                request.model_copy(update={"reply_to": client.reply_to}), timeout_s, on_chunk
            )
            plaintext: ChatInput | MLInput | None = sealed_request.plaintext
            request = sealed_request.request.model_copy(update={"payload": plaintext})
        else:
            request = request.model_copy(update={"reply_to": client.reply_to})
            reply = await client.request(request, timeout_s, on_chunk)
            plaintext = None
        trust = client.trust.snapshot()
    if isinstance(reply, InferenceResult):
        report = verify_result(reply, request, trust=trust, plaintext=plaintext)
    else:
        report = verify_error(reply, request, trust=trust, plaintext=plaintext)
    return OneShot(request, reply, report, plaintext)
