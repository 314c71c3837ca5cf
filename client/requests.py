"""Building requests: ids, deadlines and payloads, validated before anything is sent."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from schemas.base import SettlementMode, VerificationMode
from schemas.requests import ChatInput, InferenceRequest, MLInput, input_hash
from schemas.signing import ChainSigner, Signer
from schemas.verify.payer import request_grant, sign_grant

__all__ = ["build_request", "new_request_id", "parse_payload"]

_PAYLOAD: TypeAdapter[ChatInput | MLInput] = TypeAdapter(
    Annotated[ChatInput | MLInput, Field(discriminator="kind")]
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def parse_payload(value: dict[str, Any] | str | bytes) -> ChatInput | MLInput:
    """A payload from a dict or JSON text; raises ``pydantic.ValidationError`` when invalid."""
    if isinstance(value, dict):
        return _PAYLOAD.validate_python(value)
    return _PAYLOAD.validate_json(value)


def build_request(
    model: str,
    payload: ChatInput | MLInput,
    *,
    request_id: str | None = None,
    reply_to: str | None = None,
    deadline_s: float | None = None,
    payer_key: Signer | ChainSigner | None = None,
    mode: VerificationMode = VerificationMode.VANILLA,
    settlement: SettlementMode = SettlementMode.BATCH,
    stream: bool = False,
) -> InferenceRequest:
    """A request for ``model``. With ``payer_key`` (an ed25519 ``Signer`` or a secp256k1
    ``ChainSigner``) the request names that payer and carries its signature over the request's
    grant (``schemas.payer``): settlement bills it to that key. Set every field now: a sealed
    request binds them, and a payer's signature covers the settlement mode and the budget."""
    now_ms = time.time_ns() // 1_000_000
    request = InferenceRequest(
        request_id=request_id or new_request_id(),
        model=model,
        mode=mode,
        settlement=settlement,
        reply_to=reply_to,
        created_unix_ms=now_ms,
        deadline_unix_ms=None if deadline_s is None else now_ms + int(deadline_s * 1000),
        stream=stream,
        payload=payload,
    )
    if payer_key is None:
        return request
    grant = request_grant(request, payload, input_hash(payload))
    return request.model_copy(update={"payer": sign_grant(grant, payer_key)})
