"""Sealed (end-to-end encrypted) requests and replies.

A client encrypts the request payload once with a fresh 32-byte content key (XSalsa20-Poly1305,
NaCl ``SecretBox``) and seals that key to the X25519 key of every active node serving the model
(NaCl ``SealedBox``), so any one of them can open it while Kafka carries only ciphertext. The
node answers with the output sealed to the client's one-time ``reply_public_key``. The signed
envelope still carries ``input_hash`` and ``output_hash`` over the *plaintext* payload and
output, so the client verifies a sealed result exactly like a plain one.

The plaintext inside ``ciphertext`` is the RFC 8785 form of ``SealedPlaintext``: it repeats
every field of the request the node acts on (id, model, mode, settlement mode, reply key, reply
topic, payer, creation time, deadline, stream flag). The node compares each with the request's
clear fields and refuses any difference (``sealed_mismatch``), so nobody who copies a sealed
request can redirect its answer to another key or topic, bill it to someone else, or change
how it runs: only the client who sealed it chose those fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StringConstraints

from schemas import limits
from schemas.base import (
    Hex32,
    ModelName,
    RequestId,
    SettlementMode,
    TopicName,
    UnixMs,
    VerificationMode,
    WireModel,
)
from schemas.payer import Payer

__all__ = [
    "SEALED_ALG",
    "Base64",
    "SealedInput",
    "SealedPlaintext",
    "SealedRecipient",
]

SEALED_ALG = "x25519-sealedbox/xsalsa20-poly1305/v1"
MAX_RECIPIENTS = 64

Base64 = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=limits.MAX_MESSAGE_BYTES),
]
"""Standard base64 (RFC 4648 section 4) with padding."""


class SealedRecipient(WireModel):
    x25519_public_key: Hex32
    """The node's X25519 key, as published in its registration."""
    sealed_key: Base64
    """``SealedBox(x25519_public_key).encrypt(content_key)``: 80 bytes."""


class SealedInput(WireModel):
    """A request payload only the listed nodes can read (``payload.kind == "sealed"``)."""

    kind: Literal["sealed"] = "sealed"
    alg: Literal["x25519-sealedbox/xsalsa20-poly1305/v1"] = "x25519-sealedbox/xsalsa20-poly1305/v1"
    recipients: list[SealedRecipient] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    ciphertext: Base64
    """``SecretBox(content_key).encrypt(plaintext)``: 24-byte nonce, then the box."""
    reply_public_key: Hex32
    """The client's one-time X25519 key; the output is sealed to it."""


class SealedPlaintext(WireModel):
    """What ``SealedInput.ciphertext`` decrypts to (as RFC 8785 JSON): the payload, and a copy
    of every clear field of the request that the node acts on."""

    request_id: RequestId
    model: ModelName
    mode: VerificationMode
    settlement: SettlementMode
    reply_public_key: Hex32
    reply_to: TopicName | None
    payer: Payer | None
    created_unix_ms: UnixMs
    deadline_unix_ms: UnixMs | None
    stream: StrictBool
    payload: dict[str, Any]
    """The real payload (``ChatInput`` or ``MLInput`` JSON); ``input_hash`` is over it."""
