"""Base model and constrained field types shared by every wire message."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas import limits
from schemas.topics import MODEL_NAME_PATTERN, TOPIC_NAME_PATTERN

__all__ = [
    "ChainAddress",
    "ChainSignature",
    "Hex32",
    "Hex64",
    "ModelName",
    "RequestId",
    "SettlementMode",
    "TopicName",
    "UnixMs",
    "VerificationMode",
    "WireModel",
]


class WireModel(BaseModel):
    """Strict, immutable base for wire messages.

    Unknown fields are rejected rather than ignored: a field the receiver does not know would
    otherwise be dropped from the canonical form and silently escape the hash.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class VerificationMode(StrEnum):
    VANILLA = "VANILLA"
    TEE = "TEE"
    ZKML = "ZKML"


class SettlementMode(StrEnum):
    """How a result is anchored, chosen by the producer (signed into the envelope):

    - ``batch``: its Merkle leaf joins a batch whose root is anchored on chain (cheapest);
    - ``individual``: its leaf is anchored on its own, at once (for a consumer contract that
      must act on this one result);
    - ``private``: booked and billed, never anchored or published (nothing on chain links it).
    """

    BATCH = "batch"
    INDIVIDUAL = "individual"
    PRIVATE = "private"


RequestId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._:-]+$", min_length=1, max_length=limits.MAX_ID_CHARS),
]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
TopicName = Annotated[str, StringConstraints(pattern=TOPIC_NAME_PATTERN)]
Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
"""32 bytes as 64 lower-case hex characters (hashes, public keys)."""
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
"""64 bytes as 128 lower-case hex characters (ed25519 signatures)."""
ChainAddress = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-f]{40}$")]
"""An EVM address, ``0x`` and lower-case hex (no EIP-55 checksum: one spelling, one hash)."""
ChainSignature = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-f]{130}$")]
"""65 bytes ``r || s || v`` as ``0x`` and 130 lower-case hex characters (EIP-191)."""
UnixMs = Annotated[int, Field(ge=0, le=2**53 - 1)]
