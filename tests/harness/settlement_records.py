"""Settlement-topic messages for settlement and batcher scenarios, sent through any Kafka port.

``signed_record`` builds a record as a node signs it; ``registration`` the registry message
that makes settlement accept a node's records (as ``tests.harness.support.register_node``
does, but as bytes, so the in-memory cluster can carry it too).
"""

from __future__ import annotations

import hashlib
import time

from schemas.base import VerificationMode
from schemas.codec import encode
from schemas.registry import (
    REGISTRATION_DOMAIN,
    NodeRegistration,
    RegisteredModel,
    RegistrationRecord,
    registration_key,
)
from schemas.results import ResultEnvelope, Usage
from schemas.settlement import SettlementRecord
from schemas.signing import Signer

__all__ = ["MODEL", "now_ms", "registration", "signed_record", "with_bad_signature"]

MODEL = "demo-mlp"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def signed_record(
    signer: Signer, request_id: str, *, signed_unix_ms: int | None = None, tokens: int = 1
) -> SettlementRecord:
    """A valid record of ``request_id`` answered by ``signer``'s node."""
    envelope = ResultEnvelope(
        request_id=request_id,
        model_id=MODEL,
        model_digest="ab" * 32,
        mode=VerificationMode.VANILLA,
        input_hash=hashlib.sha256(request_id.encode()).hexdigest(),
        output_hash=hashlib.sha256(request_id.encode() + b"/out").hexdigest(),
        usage=Usage(input_tokens=tokens, output_tokens=1),
        payer="acct-1",
        node_id=signer.node_id,
        signed_unix_ms=now_ms() if signed_unix_ms is None else signed_unix_ms,
    )
    return SettlementRecord(envelope=envelope, signature=signer.sign_envelope(envelope))


def with_bad_signature(record: SettlementRecord) -> SettlementRecord:
    """``record`` with one signature byte flipped."""
    flipped = f"{int(record.signature[:2], 16) ^ 1:02x}" + record.signature[2:]
    return record.model_copy(update={"signature": flipped})


def registration(signer: Signer, *, heartbeat_interval_s: float = 3600.0) -> tuple[bytes, bytes]:
    """(key, value) of a valid, fresh registration of ``signer``'s node for ``MODEL``."""
    at_ms = now_ms()
    node = NodeRegistration(
        node_id=signer.node_id,
        x25519_public_key="00" * 32,
        chain_address="0x" + "00" * 20,
        models=[RegisteredModel(name=MODEL, digest="ab" * 32, modes=[VerificationMode.VANILLA])],
        software_version="test",
        started_unix_ms=at_ms - 60_000,
        heartbeat_unix_ms=at_ms,
        heartbeat_interval_s=heartbeat_interval_s,
    )
    record = RegistrationRecord(registration=node, signature=signer.sign(REGISTRATION_DOMAIN, node))
    return registration_key(signer.node_id), encode(record)
