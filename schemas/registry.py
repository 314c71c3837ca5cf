"""Node registrations on the compacted ``<ns>.registry`` topic.

Kafka key: ``node_id`` for registrations (each heartbeat re-publishes the whole signed record
with a new ``heartbeat_unix_ms``, so compaction keeps exactly the latest state of each node),
and ``revocation:<node_id>`` for revocations (kept beside it by compaction).

A registration is signed by the node's ed25519 key over
``domain_digest(REGISTRATION_DOMAIN, registration)``; a revocation by a registry authority key
over ``domain_digest(REVOCATION_DOMAIN, revocation)``. The attestation evidence, when present,
binds all three node keys (``schemas.attestation``).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, StringConstraints

from schemas import limits
from schemas.attestation import Attestation
from schemas.base import Hex32, Hex64, ModelName, UnixMs, VerificationMode, WireModel
from schemas.signing import verify_signature
from schemas.version import SCHEMA_VERSION

__all__ = [
    "REGISTRATION_DOMAIN",
    "REVOCATION_DOMAIN",
    "ChainAddress",
    "NodeRegistration",
    "NodeStatus",
    "RegisteredModel",
    "RegistrationRecord",
    "Revocation",
    "RevocationRecord",
    "registration_key",
    "revocation_key",
    "verify_registration",
    "verify_revocation",
]

REGISTRATION_DOMAIN: Final = b"og-inference-node/node-registration/v1"
REVOCATION_DOMAIN: Final = b"og-inference-node/node-revocation/v1"
MAX_MODELS = 256

ChainAddress = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-f]{40}$")]
"""An EVM address, lower-case hex (no EIP-55 checksum: one spelling, one hash)."""
NodeStatus = Literal["active", "draining", "retired"]


class RegisteredModel(WireModel):
    name: ModelName
    digest: Hex32
    """``model_digest`` the node signs for this model."""
    modes: list[VerificationMode] = Field(min_length=1, max_length=3)
    private: bool = False
    """Private models accept sealed requests only."""


class NodeRegistration(WireModel):
    """What a node states about itself. ``node_id`` is its ed25519 public key."""

    schema_version: Literal[1] = SCHEMA_VERSION
    node_id: Hex32
    x25519_public_key: Hex32
    """Sealed requests are sealed to this key."""
    chain_address: ChainAddress
    """The node's secp256k1 account (its chain transactions and payouts)."""
    models: list[RegisteredModel] = Field(max_length=MAX_MODELS)
    software_version: str = Field(min_length=1, max_length=64)
    attestation: Attestation | None = None
    """Hardware evidence binding the three keys above; None on a node with no TEE at all."""
    status: NodeStatus = "active"
    started_unix_ms: UnixMs
    heartbeat_unix_ms: UnixMs
    heartbeat_interval_s: float = Field(gt=0, le=3600)


class RegistrationRecord(WireModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["node_registration"] = "node_registration"
    registration: NodeRegistration
    signature: Hex64


class Revocation(WireModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    node_id: Hex32
    revoked_unix_ms: UnixMs
    """Records the node signed at or after this time are rejected."""
    reason: str = Field(max_length=limits.MAX_ERROR_MESSAGE_CHARS)
    authority_id: Hex32
    """The ed25519 key of the registry authority that signs this revocation."""


class RevocationRecord(WireModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["node_revocation"] = "node_revocation"
    revocation: Revocation
    signature: Hex64


def registration_key(node_id: str) -> bytes:
    return node_id.encode()


def revocation_key(node_id: str) -> bytes:
    return f"revocation:{node_id}".encode()


def verify_registration(record: RegistrationRecord) -> bool:
    """True when the registration is signed by the node it names."""
    return verify_signature(
        REGISTRATION_DOMAIN, record.registration.node_id, record.registration, record.signature
    )


def verify_revocation(record: RevocationRecord) -> bool:
    """True when signed by ``authority_id`` (whether that authority is trusted is policy)."""
    return verify_signature(
        REVOCATION_DOMAIN,
        record.revocation.authority_id,
        record.revocation,
        record.signature,
    )
