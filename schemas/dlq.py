"""Dead letters on ``<ns>.dlq``: messages a worker could not answer, with the reason.

Kafka key: none. Headers repeat the reason and the original coordinates (``og-reason``,
``og-original-topic``, ``og-original-partition``, ``og-original-offset``, ``og-attempts``) for
tools that read headers only. The original bytes may hold a prompt, so they travel sealed to
the operator's X25519 key (``sealed_payload_hex``: NaCl ``SealedBox``), never in clear.

Anyone who can write the DLQ topic can forge an entry: readers treat every field as untrusted
(``inference-node dlq replay`` re-publishes only to topics the deployment allows, and only what
opens with the operator's key).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from schemas import limits
from schemas.base import Hex32, TopicName, UnixMs, WireModel
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = ["MAX_DLQ_COPY_BYTES", "DlqEntry"]

MAX_DLQ_COPY_BYTES = 400_000
"""Originals up to this size are copied (sealed, hex: about twice the size) into the entry;
larger ones keep only their hash and coordinates (the original stays on its topic)."""

_HEX = Annotated[
    str, StringConstraints(pattern=r"^(?:[0-9a-f]{2})*$", max_length=2 * MAX_DLQ_COPY_BYTES + 200)
]


class DlqEntry(WireModel):
    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["dlq_entry"] = "dlq_entry"
    reason: str = Field(max_length=limits.MAX_ERROR_MESSAGE_CHARS)
    original_topic: TopicName
    original_partition: int = Field(ge=0, le=2**31 - 1)
    original_offset: int = Field(ge=0, le=2**63 - 1)
    attempts: int = Field(ge=1, le=1_000_000)
    size_bytes: int = Field(ge=0)
    sha256: Hex32
    """Of the original bytes (an empty value hashes as zero bytes)."""
    sealed_payload_hex: _HEX | None
    """The original bytes sealed to the operator's DLQ key, or None when too large to copy."""
    dead_lettered_unix_ms: UnixMs
