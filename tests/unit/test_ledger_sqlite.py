"""``settlement.ledger`` on SQLite (tmp files): storing, deduplicating, rejections, replays."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.results import ResultEnvelope, Usage
from schemas.settlement import SettlementRecord
from schemas.signing import Signer
from schemas.verify.record import Rejected
from settlement.ledger import Accepted, Origin, Rejection, SqliteLedger
from tests.harness.nodes import TestNode

NOW_MS = 1_700_000_000_000
SKEW_S = 5.0
SIGNER = TestNode.seeded(1)
OTHER = TestNode.seeded(2)


PAYER = Signer(b"\x0b" * 32)


def _record(node: TestNode = SIGNER, **overrides: object) -> SettlementRecord:
    fields: dict[str, object] = {
        "model_digest": "a" * 64,
        "input_hash": "b" * 64,
        "output_hash": "c" * 64,
        "usage": Usage(input_tokens=2, output_tokens=9),
        "max_output_tokens": 16,
        "payer": PAYER,
        "signed_unix_ms": NOW_MS,
        "request_created_unix_ms": NOW_MS - 1000,
    }
    fields.update(overrides)
    return node.record(str(fields.pop("request_id", "req-s-1")), **fields)


# --- SqliteLedger ----------------------------------------------------------------------------


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger" / "settlement.db"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[SqliteLedger]:
    db = SqliteLedger(ledger_path)
    try:
        yield db
    finally:
        db.close()


def _rejection(offset: int, reason: str = "bad_signature") -> Rejection:
    outcome = Rejected(reason, "detail", "req-s-1", None)
    return Rejection(outcome, b"raw bytes", Origin("og.settlement", 0, offset))


def _accepted(*records: SettlementRecord, origins: tuple[str, ...] = ()) -> list[Accepted]:
    if not origins:
        return [Accepted(r) for r in records]
    return [Accepted(r, Origin.parse(o)) for r, o in zip(records, origins, strict=True)]


def test_same_record_twice_is_stored_once(ledger: SqliteLedger) -> None:
    record = _record()
    assert ledger.store(_accepted(record)).inserted == 1
    assert ledger.store(_accepted(record)).inserted == 0
    assert ledger.count() == 1


def test_duplicate_within_one_batch_is_stored_once(ledger: SqliteLedger) -> None:
    record = _record()
    assert ledger.store(_accepted(record, record)).inserted == 1
    assert ledger.count() == 1


def test_a_request_is_booked_once_whichever_nodes_answer_it(ledger: SqliteLedger) -> None:
    # Two nodes answered (a rebalance redelivered the request): the payer pays one of them.
    first, second = _record(SIGNER), _record(OTHER)
    stored = ledger.store([Accepted(first, Origin("og.settlement", 0, 1))])
    assert stored.inserted == 1
    stored = ledger.store([Accepted(second, Origin("og.settlement", 1, 1))])
    assert (stored.inserted, stored.refused) == (0, ("already_booked",))
    assert [row["node_id"] for row in ledger.get("req-s-1")] == [SIGNER.node_id]
    assert ledger.rejection_counts() == {"already_booked": 1}
    # Another payer's request of the same id is another booking.
    other_payer = _record(OTHER, payer=Signer(b"\x0c" * 32))
    assert ledger.store([Accepted(other_payer, Origin("og.settlement", 1, 2))]).inserted == 1


def test_rejections_are_counted_by_reason(ledger: SqliteLedger) -> None:
    inserted = ledger.store(
        _accepted(_record()),
        [_rejection(1), _rejection(2), _rejection(3, "not_decodable"), _rejection(4)],
    )
    assert inserted.inserted == 1  # rejections are not records
    assert ledger.count() == 1
    assert ledger.rejection_counts() == {"bad_signature": 3, "not_decodable": 1}


def test_rejection_redelivered_at_same_offset_counts_once(ledger: SqliteLedger) -> None:
    assert ledger.store([], [_rejection(7)]).inserted == 0
    assert ledger.store([], [_rejection(7)]).inserted == 0
    assert ledger.rejection_counts() == {"bad_signature": 1}
    ledger.store([], [Rejection(Rejected("bad_signature"), None, Origin("og.settlement", 1, 7))])
    assert ledger.rejection_counts() == {"bad_signature": 2}  # another partition


def test_rejection_row_keeps_reason_and_hash_of_raw(
    ledger: SqliteLedger, ledger_path: Path
) -> None:
    ledger.store([], [_rejection(9, "future_timestamp")])
    with sqlite3.connect(ledger_path) as db:
        row = db.execute(
            'SELECT reason, detail, request_id, raw_sha256, topic, "offset" FROM rejections'
        ).fetchone()
    db.close()
    assert row == (
        "future_timestamp",
        "detail",
        "req-s-1",
        hashlib.sha256(b"raw bytes").hexdigest(),
        "og.settlement",
        9,
    )


def test_reopening_keeps_rows_and_schema_version(ledger_path: Path) -> None:
    first = SqliteLedger(ledger_path)
    first.store(_accepted(_record()), [_rejection(1)])
    first.close()

    second = SqliteLedger(ledger_path)
    try:
        assert second.count() == 1
        assert second.rejection_counts() == {"bad_signature": 1}
        assert second.store(_accepted(_record())).inserted == 0
    finally:
        second.close()

    db = sqlite3.connect(ledger_path)
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    finally:
        db.close()
    # v1 records + rejections, v2 Merkle batches, v3 origins, v4 proofs, v5 bookings,
    # v6 published batches and chain signatures
    assert version == 6


def test_get_returns_row_with_parseable_envelope(ledger: SqliteLedger) -> None:
    record = _record()
    ledger.store(_accepted(record))
    rows = ledger.get("req-s-1")
    assert len(rows) == 1
    row = rows[0]
    assert ResultEnvelope.model_validate_json(row["envelope_json"]) == record.envelope
    assert row["signature"] == record.signature
    assert row["node_id"] == SIGNER.node_id
    assert row["mode"] == "VANILLA"
    assert (row["input_tokens"], row["output_tokens"]) == (2, 9)
    assert row["payer"] == f"ed25519:{PAYER.node_id}"
    assert row["signed_unix_ms"] == NOW_MS
    assert ledger.get("no-such-request") == []


def test_failed_batch_stores_nothing(ledger: SqliteLedger) -> None:
    # A value sqlite3 cannot bind fails the batch after the record insert ran: roll back all.
    bad: Any = Rejection(Rejected("bad_signature"), b"", Origin(object(), 0, 1))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):
        ledger.store(_accepted(_record()), [bad])
    assert ledger.count() == 0
    assert ledger.rejection_counts() == {}


def test_replay_from_another_message_is_rejected_but_redelivery_is_not(
    ledger: SqliteLedger,
) -> None:
    record = _record(TestNode.seeded(9))
    assert ledger.store(_accepted(record, origins=("og.settlement/0/5",))).inserted == 1
    # The same message again (a redelivery after a crash): nothing new, nothing rejected.
    assert ledger.store(_accepted(record, origins=("og.settlement/0/5",))).inserted == 0
    assert ledger.rejection_counts() == {}
    # The same record in another message: a replay, booked as a rejection with its origin.
    assert ledger.store(_accepted(record, origins=("og.settlement/2/9",))).inserted == 0
    assert ledger.rejection_counts() == {"replay": 1}
    # ...and only once, however often that message is redelivered.
    ledger.store(_accepted(record, origins=("og.settlement/2/9",)))
    assert ledger.rejection_counts() == {"replay": 1}
    assert ledger.count() == 1


def test_replay_within_one_batch(ledger: SqliteLedger) -> None:
    record = _record(TestNode.seeded(8))
    assert ledger.store(_accepted(record, record, origins=("t/0/1", "t/0/2"))).inserted == 1
    assert ledger.rejection_counts() == {"replay": 1}
