"""The ``proofs`` table (migration v4): one row per (request id, node id), shared SQL for both
backends, run inside ``SqlLedger.store``'s transaction.

A proof row is linked to the result record with the same key. Its status:

- ``verified``: the proof checked out (``settlement.proofs``) and the stored result record has
  the same model digest, input hash and output hash;
- ``pending``: the proof checked out, but its result record has not arrived yet. When the
  record is stored, the row becomes ``verified`` or ``rejected`` (``result_mismatch``);
- ``rejected``: the proof failed a check (``reason``), or names other hashes than the result.

Only a better status replaces a stored one (verified > pending > rejected), so a tampered copy
arriving after a good proof never downgrades it; redelivery of the same proof is a no-op.
Proofs without a valid node signature never reach this table (only ``rejections``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

from settlement.ledger.base import ProofEntry

__all__ = ["PROOF_COLUMNS", "link_pending_proofs", "store_proofs"]

ProofStatus = Literal["verified", "pending", "rejected"]

PROOF_COLUMNS: tuple[str, ...] = (
    "request_id",
    "node_id",
    "model_id",
    "model_digest",
    "input_hash",
    "output_hash",
    "vk_digest",
    "srs_label",
    "srs_digest",
    "proof_sha256",
    "status",
    "reason",
    "signed_unix_ms",
    "received_unix_ms",
    "origin",
)

_RANK = "CASE {0}.status WHEN 'verified' THEN 2 WHEN 'pending' THEN 1 ELSE 0 END"
_MATCH = (
    "r.request_id = proofs.request_id AND r.node_id = proofs.node_id"
    " AND r.model_digest = proofs.model_digest AND r.input_hash = proofs.input_hash"
    " AND r.output_hash = proofs.output_hash"
)
_KEY = "r.request_id = proofs.request_id AND r.node_id = proofs.node_id"


def _row(
    entry: ProofEntry, status: ProofStatus, reason: str | None, now_ms: int
) -> tuple[Any, ...]:
    c = entry.record.claims
    return (
        c.request_id,
        c.node_id,
        c.model_id,
        c.model_digest,
        c.input_hash,
        c.output_hash,
        c.vk_digest,
        c.srs_label,
        c.srs_digest,
        hashlib.sha256(c.proof.encode()).hexdigest(),
        status,
        reason,
        c.signed_unix_ms,
        now_ms,
        None if entry.origin is None else str(entry.origin),
    )


def store_proofs(
    cur: Any, sql: Callable[[str], str], entries: Sequence[ProofEntry], now_ms: int
) -> None:
    """Insert or upgrade proof rows; a verified proof is linked to its result record here."""
    rows = []
    for entry in entries:
        status: ProofStatus = entry.status
        reason = entry.reason
        if status == "verified":
            c = entry.record.claims
            cur.execute(
                sql(
                    "SELECT model_digest, input_hash, output_hash FROM records"
                    " WHERE request_id = ? AND node_id = ?"
                ),
                (c.request_id, c.node_id),
            )
            found = cur.fetchall()
            if not found:
                status = "pending"
            elif tuple(found[0]) != (c.model_digest, c.input_hash, c.output_hash):
                status, reason = "rejected", "result_mismatch"
        rows.append(_row(entry, status, reason, now_ms))
    if not rows:
        return
    updates = ", ".join(f"{c} = excluded.{c}" for c in PROOF_COLUMNS[2:])
    cur.executemany(
        sql(
            f"INSERT INTO proofs ({', '.join(PROOF_COLUMNS)})"  # noqa: S608 (constants only)
            f" VALUES ({', '.join('?' for _ in PROOF_COLUMNS)})"
            f" ON CONFLICT (request_id, node_id) DO UPDATE SET {updates}"
            f" WHERE {_RANK.format('proofs')} < {_RANK.format('excluded')}"
        ),
        rows,
    )


def link_pending_proofs(cur: Any) -> None:
    """Settle ``pending`` proofs whose result record is now stored (same transaction)."""
    cur.execute(
        "UPDATE proofs SET"  # noqa: S608 (constants only)
        f" reason = CASE WHEN EXISTS (SELECT 1 FROM records r WHERE {_MATCH})"
        " THEN NULL ELSE 'result_mismatch' END,"
        f" status = CASE WHEN EXISTS (SELECT 1 FROM records r WHERE {_MATCH})"
        " THEN 'verified' ELSE 'rejected' END"
        f" WHERE status = 'pending' AND EXISTS (SELECT 1 FROM records r WHERE {_KEY})"
    )
