"""The settlement ledger (SQLite). One row per (request id, node id): a redelivered record is
stored once. Rejections are stored too, with their reason, so nothing disappears silently.

Synchronous by design (sqlite3 is); the service calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.settlement import SettlementRecord
from settlement.verify import Rejected

__all__ = ["SqliteLedger"]

_MIGRATIONS: list[str] = [
    """
    CREATE TABLE records (
        request_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        model_id TEXT NOT NULL,
        model_digest TEXT NOT NULL,
        mode TEXT NOT NULL,
        input_hash TEXT NOT NULL,
        output_hash TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        payer TEXT,
        signed_unix_ms INTEGER NOT NULL,
        signature TEXT NOT NULL,
        envelope_json TEXT NOT NULL,
        received_unix_ms INTEGER NOT NULL,
        PRIMARY KEY (request_id, node_id)
    );
    CREATE TABLE rejections (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        request_id TEXT,
        node_id TEXT,
        raw_sha256 TEXT NOT NULL,
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        "offset" INTEGER NOT NULL,
        received_unix_ms INTEGER NOT NULL,
        UNIQUE (topic, partition, "offset")
    );
    """,
]


class SqliteLedger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            self._db.execute("BEGIN")
            for statement in script.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {number}")
            self._db.execute("COMMIT")

    def store(
        self,
        accepted: Sequence[SettlementRecord],
        rejected: Sequence[tuple[Rejected, bytes | None, str, int, int]],
    ) -> int:
        """Store a batch in one transaction; return how many records were new."""
        now = time.time_ns() // 1_000_000
        rows = [_row(r, now) for r in accepted]
        self._db.execute("BEGIN")
        try:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (request_id, node_id) DO NOTHING",
                rows,
            )
            inserted = self._db.total_changes - before
            self._db.executemany(
                "INSERT INTO rejections (reason, detail, request_id, node_id, raw_sha256,"
                ' topic, partition, "offset", received_unix_ms) VALUES (?,?,?,?,?,?,?,?,?)'
                ' ON CONFLICT (topic, partition, "offset") DO NOTHING',
                [
                    (
                        rej.reason,
                        rej.detail,
                        rej.request_id,
                        rej.node_id,
                        hashlib.sha256(raw or b"").hexdigest(),
                        topic,
                        partition,
                        offset,
                        now,
                    )
                    for rej, raw, topic, partition, offset in rejected
                ],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return inserted

    def count(self) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
        return int(n)

    def rejection_counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT reason, COUNT(*) FROM rejections GROUP BY reason")
        return {reason: int(n) for reason, n in rows}

    def get(self, request_id: str) -> list[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM records WHERE request_id = ?", (request_id,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        self._db.close()


def _row(record: SettlementRecord, now_ms: int) -> tuple[Any, ...]:
    e = record.envelope
    return (
        e.request_id,
        e.node_id,
        e.model_id,
        e.model_digest,
        e.mode.value,
        e.input_hash,
        e.output_hash,
        e.usage.input_tokens,
        e.usage.output_tokens,
        e.payer,
        e.signed_unix_ms,
        record.signature,
        e.model_dump_json(),
        now_ms,
    )
