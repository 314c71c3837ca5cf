"""Record verification: pure, no I/O. Returns ``Verified`` or ``Rejected`` (with a reason that
is safe to store and count), never raises for bad input."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from schemas.base import VerificationMode
from schemas.codec import Decoded, decode
from schemas.settlement import SettlementRecord
from schemas.signing import verify_envelope_signature

__all__ = ["NodeGate", "Rejected", "Verified", "verify_record"]


class NodeGate(Protocol):
    """Whether the node that signed a record may settle it (see ``client.registry``)."""

    def check_record(
        self, node_id: str, signed_unix_ms: int, mode: VerificationMode
    ) -> str | None: ...


@dataclass(frozen=True)
class Verified:
    record: SettlementRecord


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
    now_ms: int | None = None,
    nodes: NodeGate | None = None,
) -> Verified | Rejected:
    decoded = decode(raw, SettlementRecord)
    if not isinstance(decoded, Decoded):
        return Rejected("not_decodable", decoded.reason, decoded.request_id)
    record = decoded.message
    envelope = record.envelope
    if not verify_envelope_signature(envelope, record.signature):
        return Rejected("bad_signature", "", envelope.request_id, envelope.node_id)
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if envelope.signed_unix_ms > now + max_clock_skew_s * 1000:
        return Rejected("future_timestamp", "", envelope.request_id, envelope.node_id)
    if nodes is not None:
        reason = nodes.check_record(envelope.node_id, envelope.signed_unix_ms, envelope.mode)
        if reason is not None:
            return Rejected(reason, "", envelope.request_id, envelope.node_id)
    return Verified(record)
