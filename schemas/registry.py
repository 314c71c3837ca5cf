"""Node registrations on the compacted ``<ns>.registry`` topic: the fast discovery path.

Kafka key: ``node_id`` (each heartbeat re-publishes the whole signed record with a new
``heartbeat_unix_ms`` and ``sequence``, so compaction keeps the latest state of each node).

A registration is signed by the node's ed25519 key over
``domain_digest(REGISTRATION_DOMAIN, registration)``; the attestation evidence, when present,
binds all three node keys (``schemas.attestation``). A registration says what a node claims;
whether it counts is decided by admission (``schemas.admission``): anyone can write this topic
and register a key of their own, and anyone can erase or replay a compacted key, so revocation
never travels here.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field

from schemas.attestation import Attestation
from schemas.base import ChainAddress, Hex32, Hex64, ModelName, UnixMs, VerificationMode, WireModel
from schemas.signing import verify_signature
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = [
    "REGISTRATION_DOMAIN",
    "NodeRegistration",
    "NodeStatus",
    "RegisteredModel",
    "RegistrationRecord",
    "registration_key",
    "verify_registration",
]

REGISTRATION_DOMAIN: Final = b"og-inference-node/node-registration/v2"
MAX_MODELS = 256

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

    schema_version: SchemaVersion = SCHEMA_VERSION
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
    sequence: int = Field(ge=0, le=2**53 - 1)
    """Strictly increasing with every registration or heartbeat the node publishes, across
    restarts (the node derives it from its clock, never reusing one): verifiers ignore any
    registration whose sequence is not above the latest they accepted, so an old signed
    registration replayed on the topic changes nothing."""


class RegistrationRecord(WireModel):
    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["node_registration"] = "node_registration"
    registration: NodeRegistration
    signature: Hex64


def registration_key(node_id: str) -> bytes:
    return node_id.encode()


def verify_registration(record: RegistrationRecord) -> bool:
    """True when the registration is signed by the node it names."""
    return verify_signature(
        REGISTRATION_DOMAIN, record.registration.node_id, record.registration, record.signature
    )
