"""Decoding wire bytes into typed messages, and encoding them back.

Decoding never raises for bad input: it returns ``Decoded`` or ``Undecodable``, because a bad
message is an expected event for a consumer (it answers or dead-letters it), not a crash.
``Undecodable`` keeps whatever routing information could still be read (request id, reply
topic), so the worker can send a typed error instead of dead-lettering when possible.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from schemas import limits
from schemas.topics import TOPIC_NAME_PATTERN

__all__ = ["Decoded", "Undecodable", "decode", "encode", "summarize_validation_error"]

M = TypeVar("M", bound=BaseModel)
_REQUEST_ID_RE = re.compile(rf"^[A-Za-z0-9._:-]{{1,{limits.MAX_ID_CHARS}}}$")
_TOPIC_RE = re.compile(TOPIC_NAME_PATTERN)


@dataclass(frozen=True)
class Decoded(Generic[M]):
    message: M
    document: dict[str, Any]
    """The JSON object as received, before defaults were applied: hashes that must be
    reproducible by the producer are taken over this, not over the normalised model."""


@dataclass(frozen=True)
class Undecodable:
    """Why a message could not be decoded. ``reason`` is safe to log: it names fields and
    error kinds, never values."""

    reason: str
    request_id: str | None = None
    reply_to: str | None = None


def encode(message: BaseModel) -> bytes:
    """Compact JSON for the wire (not canonical: canonical bytes are only for hashing)."""
    return message.model_dump_json().encode()


def summarize_validation_error(error: ValidationError, max_items: int = 5) -> str:
    """Field paths and error types only; pydantic's own message would echo the input."""
    parts = []
    for item in error.errors(include_input=False, include_url=False)[:max_items]:
        loc = ".".join(str(p) for p in item["loc"]) or "<root>"
        parts.append(f"{loc}: {item['type']}")
    more = error.error_count() - max_items
    if more > 0:
        parts.append(f"... {more} more")
    return "invalid message: " + "; ".join(parts)


def decode(raw: bytes | None, model: type[M]) -> Decoded[M] | Undecodable:
    """Validate ``raw`` as ``model``; on failure say why and salvage the routing fields."""
    if raw is None:
        return Undecodable("empty message")
    if len(raw) > limits.MAX_MESSAGE_BYTES:
        return Undecodable(f"message of {len(raw)} bytes exceeds {limits.MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return Undecodable("not UTF-8 JSON")
    if not isinstance(obj, dict):
        return Undecodable(f"JSON {type(obj).__name__} where an object was expected")
    try:
        return Decoded(model.model_validate_json(raw), obj)
    except ValidationError as e:
        request_id = obj.get("request_id")
        reply_to = obj.get("reply_to")
        return Undecodable(
            summarize_validation_error(e),
            request_id=request_id
            if isinstance(request_id, str) and _REQUEST_ID_RE.match(request_id)
            else None,
            reply_to=reply_to if isinstance(reply_to, str) and _TOPIC_RE.match(reply_to) else None,
        )
