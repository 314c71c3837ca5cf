"""Settlement record verification: pure, no I/O, the clock passed in. Returns ``Verified`` or
``Rejected`` (with a reason that is safe to store and count), never raises for bad input.

Two steps, so a service can wait for registrations still in flight between them:
``verify_record`` decodes and checks the signature and timestamp (and, given a ``NodeGate``,
the node); ``gate_record`` applies the node gate to an already verified record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from schemas.base import VerificationMode
from schemas.codec import Decoded, decode
from schemas.settlement import SettlementRecord
from schemas.signing import envelope_digest, verify_digest

__all__ = ["NodeGate", "Rejected", "Verified", "gate_record", "verify_record"]


class NodeGate(Protocol):
    """Whether the node that signed a record may settle it (see ``schemas.verify.registry``)."""

    def check_record(
        self, node_id: str, signed_unix_ms: int, mode: VerificationMode
    ) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Verified:
    record: SettlementRecord
    digest: bytes
    """``envelope_digest`` of the record (what the node signed; its Merkle leaf commits to it)."""


@dataclass(frozen=True)
class Rejected:
    reason: str
    """Short machine-readable cause: not_decodable, bad_signature, future_timestamp, and the
    node gate's unknown_node, stale_node, revoked_node, unattested_node."""
    detail: str = ""
    request_id: str | None = None
    node_id: str | None = None


def verify_record(
    raw: bytes | None,
    *,
    max_clock_skew_s: float,
    now_ms: int,
    nodes: NodeGate | None = None,
) -> Verified | Rejected:
    decoded = decode(raw, SettlementRecord)
    if not isinstance(decoded, Decoded):
        return Rejected("not_decodable", decoded.reason, decoded.request_id)
    record = decoded.message
    envelope = record.envelope
    digest = envelope_digest(envelope)
    if not verify_digest(envelope.node_id, digest, record.signature):
        return Rejected("bad_signature", "", envelope.request_id, envelope.node_id)
    if envelope.signed_unix_ms > now_ms + max_clock_skew_s * 1000:
        return Rejected("future_timestamp", "", envelope.request_id, envelope.node_id)
    verified = Verified(record, digest)
    if nodes is not None:
        rejected = gate_record(verified, nodes)
        if rejected is not None:
            return rejected
    return verified


def gate_record(verified: Verified, nodes: NodeGate) -> Rejected | None:
    """The node gate's rejection of a verified record, or None when its node may settle it."""
    envelope = verified.record.envelope
    reason = nodes.check_record(envelope.node_id, envelope.signed_unix_ms, envelope.mode)
    if reason is None:
        return None
    return Rejected(reason, "", envelope.request_id, envelope.node_id)
