"""Building requests: ids, deadlines and payloads, validated before anything is sent."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from schemas.base import VerificationMode
from schemas.requests import ChatInput, InferenceRequest, MLInput

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
    payer: str | None = None,
    mode: VerificationMode = VerificationMode.VANILLA,
) -> InferenceRequest:
    now_ms = time.time_ns() // 1_000_000
    return InferenceRequest(
        request_id=request_id or new_request_id(),
        model=model,
        mode=mode,
        reply_to=reply_to,
        created_unix_ms=now_ms,
        deadline_unix_ms=None if deadline_s is None else now_ms + int(deadline_s * 1000),
        payer=payer,
        payload=payload,
    )
