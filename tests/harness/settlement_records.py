"""Settlement-topic messages for settlement and batcher scenarios, sent through any Kafka port.

``signed_record`` builds a record as a node signs it; ``registration`` the registry message
that makes settlement accept a node's records once the authority admits the node (as
``tests.harness.support.register_node`` does, but as bytes, so the in-memory cluster can carry
it too).
"""

from __future__ import annotations

from schemas.settlement import SettlementRecord
from tests.harness.nodes import MODEL, TestNode, now_ms

__all__ = ["MODEL", "now_ms", "registration", "signed_record", "with_bad_signature"]


def signed_record(
    node: TestNode, request_id: str, *, signed_unix_ms: int | None = None, tokens: int = 1
) -> SettlementRecord:
    """A valid record of ``request_id`` answered by ``node``."""
    overrides: dict[str, object] = {}
    if signed_unix_ms is not None:
        overrides["signed_unix_ms"] = signed_unix_ms
    return node.record(request_id, usage={"input_tokens": tokens, "output_tokens": 0}, **overrides)


def with_bad_signature(record: SettlementRecord) -> SettlementRecord:
    """``record`` with one signature byte flipped."""
    flipped = f"{int(record.signature[:2], 16) ^ 1:02x}" + record.signature[2:]
    return record.model_copy(update={"signature": flipped})


def registration(node: TestNode, *, heartbeat_interval_s: float = 3600.0) -> tuple[bytes, bytes]:
    """(key, value) of a valid, fresh registration of ``node`` for ``MODEL``."""
    return node.registration_message(heartbeat_interval_s=heartbeat_interval_s)
