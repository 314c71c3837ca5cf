"""The ledger logic both backends share: the same SQL, the same checks, the same results.

A backend supplies the connection and its transaction handling (``_transaction``), its
placeholder style, its migrations and its fastest way to insert many records
(``_insert_records``). Everything else is written once here, so SQLite and PostgreSQL cannot
drift apart in behaviour.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from schemas.merkle import envelope_leaf
from schemas.results import ResultEnvelope
from schemas.verify.record import Rejected
from settlement.ledger.base import (
    BATCH_COLUMNS,
    RECORD_COLUMNS,
    Accepted,
    BatchConflictError,
    BatchMember,
    BatchNotFoundError,
    BatchRow,
    Leaf,
    LedgerError,
    ProofEntry,
    Rejection,
    Stored,
    StoredRecord,
    batch_row,
    check_members,
    record_row,
    rejection_row,
    stored_record,
)
from settlement.ledger.proofs import PROOF_COLUMNS, link_pending_proofs, store_proofs

__all__ = ["SqlLedger", "now_ms"]

_GET_COLUMNS = ", ".join((*RECORD_COLUMNS, "batch_id", "leaf_index"))
_BATCH_SELECT = ", ".join(f"b.{c}" for c in BATCH_COLUMNS)
_STORED = "r.request_id, r.node_id, r.envelope_json, r.received_unix_ms"
# The f-strings in SQL below (noqa: S608) splice only these module constants and the backend's
# order column; every value goes through a bound parameter.


def _refusal(reason: str, item: Accepted) -> Rejection:
    env = item.record.envelope
    detail = {
        "replay": "already settled from another message",
        "already_booked": "the request is booked already (another node answered it)",
    }[reason]
    assert item.origin is not None
    raw = item.record.model_dump_json().encode()
    return Rejection(Rejected(reason, detail, env.request_id, env.node_id), raw, item.origin)


def _parse_envelope(text: str) -> ResultEnvelope:
    return ResultEnvelope.model_validate_json(text)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqlLedger:
    """Base of ``SqliteLedger`` and ``PostgresLedger``. Not used directly.

    One connection, one lock: every public method is one transaction and holds the lock for
    its duration, so calls from several threads (``asyncio.to_thread``) never interleave
    statements of two transactions on the shared connection.
    """

    _PARAM: ClassVar[str] = "?"
    _INTEGRITY_ERRORS: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # --- backend hooks -------------------------------------------------------------------

    def _transaction(self, *, write: bool = True) -> AbstractContextManager[Any]:
        """Begin; yield a DB-API cursor; commit on success, roll back on any exception.
        ``write=False`` marks a read-only transaction, which need not take a write lock."""
        raise NotImplementedError

    def _insert_records(self, cur: Any, rows: list[tuple[Any, ...]]) -> int:
        """Insert ``rows`` (``RECORD_COLUMNS`` order), skipping existing keys; return inserted."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- helpers -------------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return text.replace("?", self._PARAM) if self._PARAM != "?" else text

    def _query(self, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._transaction(write=False) as cur:
            cur.execute(self._sql(text), params)
            return list(cur.fetchall())

    # --- records -------------------------------------------------------------------------

    def store(
        self,
        accepted: Sequence[Accepted],
        rejected: Sequence[Rejection] = (),
        proofs: Sequence[ProofEntry] = (),
    ) -> Stored:
        now = now_ms()
        with self._lock, self._transaction() as cur:
            fresh, refused = self._classify(cur, accepted)
            rows = [record_row(item, now) for item in fresh]
            inserted = self._insert_records(cur, rows) if rows else 0
            if inserted < len(fresh):
                # Lost a race with another settlement consumer for the same booking.
                refused += self._not_inserted(cur, fresh)
            if inserted:
                link_pending_proofs(cur)
            store_proofs(cur, self._sql, proofs, now)
            rejections = [rejection_row(item, now) for item in [*rejected, *refused]]
            if rejections:
                cur.executemany(
                    self._sql(
                        "INSERT INTO rejections (reason, detail, request_id, node_id, raw_sha256,"
                        ' topic, partition, "offset", received_unix_ms)'
                        " VALUES (?,?,?,?,?,?,?,?,?)"
                        ' ON CONFLICT (topic, partition, "offset") DO NOTHING'
                    ),
                    rejections,
                )
        return Stored(inserted, tuple(r.outcome.reason for r in refused))

    def _classify(
        self, cur: Any, accepted: Sequence[Accepted]
    ) -> tuple[list[Accepted], list[Rejection]]:
        """Records to insert, and the refused: a ``replay`` (a (request, node) already stored,
        or earlier in this batch, from another message) and ``already_booked`` (another node
        booked the same request for the same payer). A redelivery of the same message is
        neither: it is dropped silently. A record without an origin is never a replay."""
        by_node: dict[tuple[str, str], str | None] = {}
        booked: set[tuple[str, str | None]] = set()
        request_ids = sorted({a.record.envelope.request_id for a in accepted})
        for start in range(0, len(request_ids), 500):
            chunk = request_ids[start : start + 500]
            cur.execute(
                self._sql(
                    "SELECT request_id, node_id, origin, payer, booking FROM records"  # noqa: S608
                    f" WHERE request_id IN ({', '.join('?' for _ in chunk)})"
                ),
                chunk,
            )
            for rid, nid, origin, payer, booking in cur.fetchall():
                by_node[(rid, nid)] = origin
                if booking == 1:
                    booked.add((rid, payer))
        fresh: list[Accepted] = []
        refused: list[Rejection] = []
        for item in accepted:
            env = item.record.envelope
            key = (env.request_id, env.node_id)
            booking = (env.request_id, None if env.payer is None else env.payer.account)
            origin = None if item.origin is None else str(item.origin)
            if key in by_node:
                if item.origin is not None and by_node[key] not in (None, origin):
                    refused.append(_refusal("replay", item))
                continue
            if booking in booked:
                if item.origin is not None:
                    refused.append(_refusal("already_booked", item))
                continue
            by_node[key] = origin
            booked.add(booking)
            fresh.append(item)
        return fresh, refused

    def _not_inserted(self, cur: Any, fresh: Sequence[Accepted]) -> list[Rejection]:
        keys = {(a.record.envelope.request_id, a.record.envelope.node_id) for a in fresh}
        present: set[tuple[str, str]] = set()
        request_ids = sorted({rid for rid, _ in keys})
        for start in range(0, len(request_ids), 500):
            chunk = request_ids[start : start + 500]
            cur.execute(
                self._sql(
                    "SELECT request_id, node_id FROM records"  # noqa: S608
                    f" WHERE request_id IN ({', '.join('?' for _ in chunk)})"
                ),
                chunk,
            )
            present.update((rid, nid) for rid, nid in cur.fetchall())
        return [
            _refusal("already_booked", a)
            for a in fresh
            if (a.record.envelope.request_id, a.record.envelope.node_id) not in present
            and a.origin is not None
        ]

    def count(self) -> int:
        ((n,),) = self._query("SELECT COUNT(*) FROM records")
        return int(n)

    def rejection_counts(self) -> dict[str, int]:
        rows = self._query("SELECT reason, COUNT(*) FROM rejections GROUP BY reason")
        return {reason: int(n) for reason, n in rows}

    def get(self, request_id: str) -> list[dict[str, Any]]:
        with self._lock, self._transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    f"SELECT {_GET_COLUMNS} FROM records"  # noqa: S608
                    " WHERE request_id = ? ORDER BY node_id"
                ),
                (request_id,),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def proofs(self, request_id: str) -> list[dict[str, Any]]:
        with self._lock, self._transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    f"SELECT {', '.join(PROOF_COLUMNS)} FROM proofs"  # noqa: S608
                    " WHERE request_id = ? ORDER BY node_id"
                ),
                (request_id,),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def proof_counts(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) FROM proofs GROUP BY status")
        return {status: int(n) for status, n in rows}

    def usage(self, payer: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE payer = ?", (payer,)) if payer is not None else ("", ())
        rows = self._query(
            "SELECT payer, model_id, COUNT(*),"  # noqa: S608
            " SUM(input_tokens), SUM(output_tokens)"
            f" FROM records {where} GROUP BY payer, model_id ORDER BY payer, model_id",
            params,
        )
        return [
            {
                "payer": p,
                "model_id": m,
                "requests": int(n),
                "input_tokens": int(i),
                "output_tokens": int(o),
            }
            for p, m, n, i, o in rows
        ]

    # --- batching ------------------------------------------------------------------------

    _ORDER: ClassVar[str] = "rowid"
    """Column holding insertion order: SQLite's implicit rowid, PostgreSQL's ``seq``."""

    def unbatched(self, limit: int, mode: str = "batch") -> list[Leaf]:
        rows = self._query(
            "SELECT r.request_id, r.node_id, r.leaf_hash, r.envelope_json"  # noqa: S608
            " FROM records r WHERE r.batch_id IS NULL AND r.settlement_mode = ?"
            f" ORDER BY r.{self._ORDER} LIMIT ?",
            (mode, limit),
        )
        return [
            # Rows stored before leaves were kept at insert (ledger v4) compute it here.
            Leaf(rid, nid, leaf or "0x" + envelope_leaf(_parse_envelope(envelope)).hex())
            for rid, nid, leaf, envelope in rows
        ]

    def oldest_unbatched_unix_ms(self) -> int | None:
        ((oldest,),) = self._query(
            "SELECT MIN(received_unix_ms) FROM records"
            " WHERE batch_id IS NULL AND settlement_mode = 'batch'"
        )
        return None if oldest is None else int(oldest)

    def unbatched_count(self) -> int:
        ((n,),) = self._query(
            "SELECT COUNT(*) FROM records WHERE batch_id IS NULL AND settlement_mode = 'batch'"
        )
        return int(n)

    def create_batch(self, root_hex: str, members: Sequence[BatchMember]) -> int:
        check_members(members)
        try:
            with self._lock, self._transaction() as cur:
                cur.execute(
                    self._sql(
                        "INSERT INTO batches (root, count, status, created_unix_ms)"
                        " VALUES (?, ?, 'built', ?) RETURNING id"
                    ),
                    (root_hex, len(members), now_ms()),
                )
                ((batch_id,),) = cur.fetchall()
                cur.executemany(
                    self._sql(
                        "UPDATE records SET batch_id = ?, leaf_index = ?, leaf_hash = ?"
                        " WHERE request_id = ? AND node_id = ? AND batch_id IS NULL"
                        " AND settlement_mode <> 'private'"
                    ),
                    [
                        (batch_id, m.leaf_index, m.leaf_hash, m.request_id, m.node_id)
                        for m in members
                    ],
                )
                if cur.rowcount != len(members):
                    raise BatchConflictError(
                        f"{len(members) - cur.rowcount} of {len(members)} members are missing,"
                        " already in a batch or private"
                    )
        except self._INTEGRITY_ERRORS as e:
            raise BatchConflictError(f"batch {root_hex} conflicts with a stored one: {e}") from e
        return int(batch_id)

    def open_batches(self) -> list[BatchRow]:
        rows = self._query(
            f"SELECT {_BATCH_SELECT} FROM batches b"  # noqa: S608
            " WHERE b.status = 'built' ORDER BY b.id"
        )
        return [batch_row(row) for row in rows]

    def batch(self, batch_id: int) -> BatchRow:
        rows = self._query(
            f"SELECT {_BATCH_SELECT} FROM batches b WHERE b.id = ?",  # noqa: S608
            (batch_id,),
        )
        if not rows:
            raise BatchNotFoundError(batch_id)
        return batch_row(rows[0])

    def mark_anchored(
        self,
        batch_id: int,
        tx_hash: str,
        block_number: int,
        gas_used: int,
        batch_index: int,
        batch_ref: str | None = None,
    ) -> None:
        with self._lock, self._transaction() as cur:
            cur.execute(
                self._sql(
                    "UPDATE batches SET status = 'anchored', tx_hash = ?, block_number = ?,"
                    " gas_used = ?, batch_index = ?, anchored_unix_ms = ?, batch_ref = ?"
                    " WHERE id = ? AND status = 'built'"
                ),
                (tx_hash, block_number, gas_used, batch_index, now_ms(), batch_ref, batch_id),
            )
            if cur.rowcount == 1:
                return
            cur.execute(self._sql("SELECT tx_hash FROM batches WHERE id = ?"), (batch_id,))
            found = cur.fetchall()
        if not found:
            raise BatchNotFoundError(batch_id)
        if found[0][0] != tx_hash:
            raise LedgerError(f"batch {batch_id} is already anchored by {found[0][0]}")

    def batch_leaves(self, batch_id: int) -> list[str]:
        rows = self._query(
            "SELECT leaf_hash FROM records WHERE batch_id = ? ORDER BY leaf_index", (batch_id,)
        )
        return [leaf for (leaf,) in rows]

    def batch_envelopes(self, batch_id: int) -> list[tuple[str, ResultEnvelope]]:
        rows = self._query(
            "SELECT leaf_hash, envelope_json FROM records WHERE batch_id = ? ORDER BY leaf_index",
            (batch_id,),
        )
        return [(leaf, _parse_envelope(envelope)) for leaf, envelope in rows]

    def unpublished_batches(self, limit: int = 100) -> list[BatchRow]:
        rows = self._query(
            f"SELECT {_BATCH_SELECT} FROM batches b"  # noqa: S608
            " WHERE b.published_unix_ms IS NULL AND b.batch_ref IS NOT NULL"
            " AND b.status = 'anchored' ORDER BY b.id LIMIT ?",
            (limit,),
        )
        return [batch_row(row) for row in rows]

    def mark_published(self, batch_id: int) -> None:
        with self._lock, self._transaction() as cur:
            cur.execute(
                self._sql("UPDATE batches SET published_unix_ms = ? WHERE id = ?"),
                (now_ms(), batch_id),
            )
            if cur.rowcount != 1:
                raise BatchNotFoundError(batch_id)

    def record_batch(
        self, request_id: str
    ) -> list[tuple[StoredRecord, BatchRow | None, int | None, str | None]]:
        rows = self._query(
            f"SELECT {_STORED}, r.leaf_index, r.leaf_hash, {_BATCH_SELECT}"  # noqa: S608
            " FROM records r LEFT JOIN batches b ON b.id = r.batch_id"
            " WHERE r.request_id = ? ORDER BY r.node_id",
            (request_id,),
        )
        result: list[tuple[StoredRecord, BatchRow | None, int | None, str | None]] = []
        for row in rows:
            record = stored_record(*row[:4])
            leaf_index, leaf_hash, batch = row[4], row[5], row[6:]
            found = batch_row(batch) if batch[0] is not None else None
            result.append((record, found, leaf_index, leaf_hash))
        return result
