"""Settlement without a broker: record verification (pure) and the SQLite ledger (tmp files)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from schemas.codec import encode
from schemas.results import ResultEnvelope, Usage
from schemas.settlement import SettlementRecord
from schemas.signing import envelope_digest
from settlement.ledger import SqliteLedger
from settlement.verify import Rejected, Verified, verify_record
from worker.trust.signer import Signer

NOW_MS = 1_700_000_000_000
SKEW_S = 5.0
SIGNER = Signer(b"\x01" * 32)
OTHER = Signer(b"\x02" * 32)


def _envelope(signer: Signer = SIGNER, **overrides: object) -> ResultEnvelope:
    fields: dict[str, object] = {
        "request_id": "req-s-1",
        "model_id": "demo-mlp",
        "model_digest": "a" * 64,
        "mode": "VANILLA",
        "input_hash": "b" * 64,
        "output_hash": "c" * 64,
        "usage": Usage(input_tokens=2, output_tokens=9),
        "payer": "alice",
        "node_id": signer.node_id,
        "signed_unix_ms": NOW_MS,
    }
    fields.update(overrides)
    return ResultEnvelope.model_validate(fields)


def _record(signer: Signer = SIGNER, **overrides: object) -> SettlementRecord:
    envelope = _envelope(signer, **overrides)
    return SettlementRecord(envelope=envelope, signature=signer.sign_envelope(envelope))


def _verify(raw: bytes | None) -> Verified | Rejected:
    return verify_record(raw, max_clock_skew_s=SKEW_S, now_ms=NOW_MS)


# --- verify_record ----------------------------------------------------------------------------


def test_valid_record_is_verified() -> None:
    record = _record()
    assert _verify(encode(record)) == Verified(record)


def test_record_at_the_skew_limit_is_verified() -> None:
    record = _record(signed_unix_ms=NOW_MS + int(SKEW_S * 1000))
    assert isinstance(_verify(encode(record)), Verified)


def test_old_record_is_verified() -> None:
    assert isinstance(_verify(encode(_record(signed_unix_ms=0))), Verified)


@pytest.mark.parametrize(
    "raw",
    [None, b"", b"not json", b"\xff\xfe", b"[]", b'{"type":"settlement_record"}', b"{}"],
    ids=["none", "empty", "text", "bad-utf8", "array", "missing-fields", "empty-object"],
)
def test_undecodable_record_rejected(raw: bytes | None) -> None:
    result = _verify(raw)
    assert isinstance(result, Rejected)
    assert result.reason == "not_decodable"
    assert result.detail
    assert result.node_id is None


def test_wrong_schema_rejected_with_salvaged_request_id() -> None:
    doc = json.loads(encode(_record()))
    doc["signature"] = "not hex"
    doc["request_id"] = "req-s-1"
    result = _verify(json.dumps(doc).encode())
    assert isinstance(result, Rejected)
    assert result.reason == "not_decodable"
    assert "signature" in result.detail
    assert result.request_id == "req-s-1"


def test_other_message_type_rejected() -> None:
    doc = json.loads(encode(_record()))
    doc["type"] = "result"
    result = _verify(json.dumps(doc).encode())
    assert isinstance(result, Rejected)
    assert result.reason == "not_decodable"


def test_tampered_output_hash_is_bad_signature() -> None:
    record = _record()
    tampered = record.model_copy(
        update={"envelope": record.envelope.model_copy(update={"output_hash": "d" * 64})}
    )
    result = _verify(encode(tampered))
    assert result == Rejected("bad_signature", "", "req-s-1", SIGNER.node_id)


def test_signature_from_another_key_is_bad_signature() -> None:
    envelope = _envelope()
    forged = SigningKey(b"\x02" * 32).sign(envelope_digest(envelope)).signature.hex()
    result = _verify(encode(SettlementRecord(envelope=envelope, signature=forged)))
    assert isinstance(result, Rejected)
    assert result.reason == "bad_signature"


def test_node_id_that_is_not_a_public_key_is_bad_signature() -> None:
    record = _record()
    # 32 bytes that do not decode to a curve point: the verifier must reject, not raise.
    envelope = record.envelope.model_copy(update={"node_id": "f" * 64})
    result = _verify(encode(record.model_copy(update={"envelope": envelope})))
    assert isinstance(result, Rejected)
    assert result.reason == "bad_signature"


def test_future_timestamp_rejected() -> None:
    record = _record(signed_unix_ms=NOW_MS + int(SKEW_S * 1000) + 1)
    result = _verify(encode(record))
    assert result == Rejected("future_timestamp", "", "req-s-1", SIGNER.node_id)


def test_future_timestamp_uses_wall_clock_by_default() -> None:
    record = _record(signed_unix_ms=2**53 - 1)
    result = verify_record(encode(record), max_clock_skew_s=SKEW_S)
    assert isinstance(result, Rejected)
    assert result.reason == "future_timestamp"


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


def _rejection(offset: int, reason: str = "bad_signature") -> tuple[Rejected, bytes, str, int, int]:
    return (Rejected(reason, "detail", "req-s-1", None), b"raw bytes", "og.settlement", 0, offset)


def test_same_record_twice_is_stored_once(ledger: SqliteLedger) -> None:
    record = _record()
    assert ledger.store([record], []) == 1
    assert ledger.store([record], []) == 0
    assert ledger.count() == 1


def test_duplicate_within_one_batch_is_stored_once(ledger: SqliteLedger) -> None:
    record = _record()
    assert ledger.store([record, record], []) == 1
    assert ledger.count() == 1


def test_same_request_from_two_nodes_is_two_rows(ledger: SqliteLedger) -> None:
    assert ledger.store([_record(SIGNER), _record(OTHER)], []) == 2
    assert ledger.count() == 2
    rows = ledger.get("req-s-1")
    assert {row["node_id"] for row in rows} == {SIGNER.node_id, OTHER.node_id}


def test_rejections_are_counted_by_reason(ledger: SqliteLedger) -> None:
    inserted = ledger.store(
        [_record()],
        [_rejection(1), _rejection(2), _rejection(3, "not_decodable"), _rejection(4)],
    )
    assert inserted == 1  # rejections are not records
    assert ledger.count() == 1
    assert ledger.rejection_counts() == {"bad_signature": 3, "not_decodable": 1}


def test_rejection_redelivered_at_same_offset_counts_once(ledger: SqliteLedger) -> None:
    assert ledger.store([], [_rejection(7)]) == 0
    assert ledger.store([], [_rejection(7)]) == 0
    assert ledger.rejection_counts() == {"bad_signature": 1}
    ledger.store([], [(Rejected("bad_signature"), None, "og.settlement", 1, 7)])
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
    first.store([_record()], [_rejection(1)])
    first.close()

    second = SqliteLedger(ledger_path)
    try:
        assert second.count() == 1
        assert second.rejection_counts() == {"bad_signature": 1}
        assert second.store([_record()], []) == 0
    finally:
        second.close()

    db = sqlite3.connect(ledger_path)
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    finally:
        db.close()
    assert version == 4  # v1 records + rejections, v2 Merkle batches, v3 origins, v4 proofs


def test_get_returns_row_with_parseable_envelope(ledger: SqliteLedger) -> None:
    record = _record()
    ledger.store([record], [])
    rows = ledger.get("req-s-1")
    assert len(rows) == 1
    row = rows[0]
    assert ResultEnvelope.model_validate_json(row["envelope_json"]) == record.envelope
    assert row["signature"] == record.signature
    assert row["node_id"] == SIGNER.node_id
    assert row["mode"] == "VANILLA"
    assert (row["input_tokens"], row["output_tokens"]) == (2, 9)
    assert row["payer"] == "alice"
    assert row["signed_unix_ms"] == NOW_MS
    assert ledger.get("no-such-request") == []


def test_failed_batch_stores_nothing(ledger: SqliteLedger) -> None:
    # A value sqlite3 cannot bind fails the batch after the record insert ran: roll back all.
    bad: Any = (Rejected("bad_signature"), b"", object(), 0, 1)
    with pytest.raises(sqlite3.Error):
        ledger.store([_record()], [bad])
    assert ledger.count() == 0
    assert ledger.rejection_counts() == {}


def test_replay_from_another_message_is_rejected_but_redelivery_is_not(
    ledger: SqliteLedger,
) -> None:
    record = _record(Signer(bytes([9]) * 32))
    assert ledger.store([record], [], ["og.settlement/0/5"]) == 1
    # The same message again (a redelivery after a crash): nothing new, nothing rejected.
    assert ledger.store([record], [], ["og.settlement/0/5"]) == 0
    assert ledger.rejection_counts() == {}
    # The same record in another message: a replay, booked as a rejection with its origin.
    assert ledger.store([record], [], ["og.settlement/2/9"]) == 0
    assert ledger.rejection_counts() == {"replay": 1}
    # ...and only once, however often that message is redelivered.
    ledger.store([record], [], ["og.settlement/2/9"])
    assert ledger.rejection_counts() == {"replay": 1}
    assert ledger.count() == 1


def test_replay_within_one_batch(ledger: SqliteLedger) -> None:
    record = _record(Signer(bytes([8]) * 32))
    assert ledger.store([record, record], [], ["t/0/1", "t/0/2"]) == 1
    assert ledger.rejection_counts() == {"replay": 1}
