"""The ledger contract, run against both backends: SQLite (tmp file) and PostgreSQL (a fresh
schema per test on the server at 127.0.0.1:5432, dropped afterwards).

Only the PostgreSQL cases carry the ``postgres`` marker; ``-m "not postgres"`` runs SQLite alone.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from schemas.merkle import MerkleTree, envelope_leaf, verify_proof
from schemas.results import ResultEnvelope, Usage
from schemas.settlement import SettlementRecord
from schemas.signing import Signer
from schemas.verify.record import Rejected
from settlement.ledger import (
    Accepted,
    BatchConflictError,
    BatchMember,
    BatchNotFoundError,
    Ledger,
    LedgerError,
    Origin,
    PostgresLedger,
    Rejection,
    SqliteLedger,
    open_ledger,
)
from settlement.ledger import postgres as pg_backend
from settlement.ledger import sqlite as sqlite_backend
from tests.harness.nodes import TestNode

PG_DSN = os.environ.get("OG_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NOW_MS = 1_700_000_000_000
SIGNER = TestNode.seeded(1)
OTHER = TestNode.seeded(2)
PAYERS = {"alice": Signer(b"\x0a" * 32), "bob": Signer(b"\x0b" * 32)}
ACCOUNT = {name: f"ed25519:{key.node_id}" for name, key in PAYERS.items()}
"""How the ledger names each payer."""

Opener = Callable[[], Ledger]


def _record(
    request_id: str = "req-l-1",
    node: TestNode = SIGNER,
    *,
    payer: str | None = "alice",
    model_id: str = "demo-mlp",
    tokens: tuple[int, int] = (2, 9),
) -> SettlementRecord:
    return node.record(
        request_id,
        model_id=model_id,
        model_digest="a" * 64,
        input_hash="b" * 64,
        output_hash="c" * 64,
        usage=Usage(input_tokens=tokens[0], output_tokens=tokens[1]),
        max_output_tokens=64,
        payer=None if payer is None else PAYERS[payer],
        signed_unix_ms=NOW_MS,
        request_created_unix_ms=NOW_MS - 1000,
    )


def _rejection(offset: int, reason: str = "bad_signature") -> Rejection:
    outcome = Rejected(reason, "detail", "req-l-1", None)
    return Rejection(outcome, b"raw", Origin("og.settlement", 0, offset))


def _accepted(*records: SettlementRecord) -> list[Accepted]:
    return [Accepted(r) for r in records]


def _drop_schema(schema: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def location(backend: str, tmp_path: Path) -> Iterator[str]:
    """Where this test's ledger lives: a file path or a PostgreSQL schema name."""
    if backend == "sqlite":
        yield str(tmp_path / "ledger.sqlite3")
        return
    schema = "t_" + uuid.uuid4().hex[:12]
    try:
        yield schema
    finally:
        _drop_schema(schema)


@pytest.fixture
def opener(backend: str, location: str) -> Iterator[Opener]:
    """Opens the ledger at this test's location (again, for reopen tests); closes all at exit."""
    opened: list[Ledger] = []

    def open_() -> Ledger:
        db: Ledger
        if backend == "sqlite":
            db = SqliteLedger(Path(location))
        else:
            db = PostgresLedger(PG_DSN, schema=location)
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


@pytest.fixture
def ledger(opener: Opener) -> Ledger:
    return opener()


def _schema_version(db: Ledger) -> int:
    assert isinstance(db, SqliteLedger | PostgresLedger)
    return db.schema_version


# --- records ---------------------------------------------------------------------------------


def test_store_is_idempotent(ledger: Ledger) -> None:
    first, second = _record("req-l-1"), _record("req-l-2")
    assert ledger.store(_accepted(first, first, second)).inserted == 2
    assert ledger.store(_accepted(first, second)).inserted == 0
    # The same request answered by another node (a redelivery): booked once, to the first.
    assert ledger.store(_accepted(_record("req-l-1", OTHER))).inserted == 0
    assert ledger.count() == 2
    (mine,) = ledger.get("req-l-1")
    assert mine["node_id"] == SIGNER.node_id
    assert ResultEnvelope.model_validate_json(mine["envelope_json"]) == first.envelope
    assert (mine["input_tokens"], mine["output_tokens"], mine["payer"]) == (2, 9, ACCOUNT["alice"])
    assert mine["batch_id"] is None
    assert ledger.get("no-such-request") == []


def test_rejections_are_deduplicated_by_offset(ledger: Ledger) -> None:
    rejections = [_rejection(1), _rejection(2), _rejection(3, "not_decodable")]
    assert ledger.store([], rejections).inserted == 0
    ledger.store([], [_rejection(1), _rejection(2)])
    ledger.store([], [Rejection(Rejected("bad_signature"), None, Origin("og.settlement", 1, 1))])
    assert ledger.rejection_counts() == {"bad_signature": 3, "not_decodable": 1}


def test_usage_per_payer_and_model(ledger: Ledger) -> None:
    ledger.store(
        _accepted(
            _record("r1", payer="alice", tokens=(1, 10)),
            _record("r2", payer="alice", tokens=(2, 20)),
            _record("r3", payer="alice", model_id="demo-lm", tokens=(3, 30)),
            _record("r4", payer="bob", tokens=(4, 40)),
            _record("r5", payer=None, tokens=(5, 50)),
        ),
    )
    alice = [
        {"payer": ACCOUNT["alice"], "model_id": "demo-lm", "requests": 1},
        {"payer": ACCOUNT["alice"], "model_id": "demo-mlp", "requests": 2},
    ]
    got = ledger.usage(ACCOUNT["alice"])
    assert [{k: u[k] for k in ("payer", "model_id", "requests")} for u in got] == alice
    assert (got[1]["input_tokens"], got[1]["output_tokens"]) == (3, 30)
    assert {(u["payer"], u["model_id"]): u["requests"] for u in ledger.usage()} == {
        (ACCOUNT["alice"], "demo-lm"): 1,
        (ACCOUNT["alice"], "demo-mlp"): 2,
        (ACCOUNT["bob"], "demo-mlp"): 1,
        (None, "demo-mlp"): 1,
    }
    assert ledger.usage("nobody") == []


def test_reopening_reruns_no_migration(opener: Opener) -> None:
    first = opener()
    assert _schema_version(first) == 6
    first.store(_accepted(_record()), [_rejection(1)])
    first.close()
    second = opener()
    assert _schema_version(second) == 6
    assert second.count() == 1
    assert second.rejection_counts() == {"bad_signature": 1}
    assert second.store(_accepted(_record())).inserted == 0


def test_v1_ledger_is_upgraded_in_place(backend: str, location: str, opener: Opener) -> None:
    row = ("req-old", SIGNER.node_id, "demo-mlp", "a" * 64, "VANILLA", "b" * 64, "c" * 64)
    envelope_json = _record("req-old").envelope.model_dump_json()
    values = (*row, 1, 2, "alice", NOW_MS, "e" * 128, envelope_json, NOW_MS)
    if backend == "sqlite":
        db = sqlite3.connect(location)
        db.executescript(sqlite_backend.MIGRATIONS[0] + "PRAGMA user_version = 1;")
        db.execute(f"INSERT INTO records VALUES ({','.join('?' * 14)})", values)
        db.commit()
        db.close()
    else:
        with psycopg.connect(PG_DSN) as conn:
            conn.execute(
                sql.SQL("CREATE SCHEMA {0}; SET search_path TO {0}").format(
                    sql.Identifier(location)
                )
            )
            conn.execute(pg_backend.MIGRATIONS[0])  # type: ignore[arg-type]
            conn.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " applied_unix_ms BIGINT NOT NULL); INSERT INTO schema_migrations"
                " VALUES (1, 0)"
            )
            conn.execute(
                "INSERT INTO records (request_id, node_id, model_id, model_digest, mode,"
                " input_hash, output_hash, input_tokens, output_tokens, payer, signed_unix_ms,"
                " signature, envelope_json, received_unix_ms)"
                f" VALUES ({','.join(['%s'] * 14)})",
                values,
            )
    ledger = opener()
    assert _schema_version(ledger) == 6
    assert [r.request_id for r in ledger.unbatched(10)] == ["req-old"]


# --- batches ---------------------------------------------------------------------------------


def _stored(ledger: Ledger, n: int) -> list[SettlementRecord]:
    records = [_record(f"req-{i:03d}") for i in range(n)]
    for record in records:  # one store per record: insertion order is the list order
        ledger.store(_accepted(record))
    return records


def test_unbatched_oldest_first(ledger: Ledger) -> None:
    assert ledger.unbatched(10) == []
    assert ledger.oldest_unbatched_unix_ms() is None
    assert ledger.unbatched_count() == 0
    records = _stored(ledger, 5)
    assert ledger.unbatched_count() == 5
    got = ledger.unbatched(3)
    assert [r.request_id for r in got] == ["req-000", "req-001", "req-002"]
    # The leaf is stored with the record: batching never re-reads an envelope.
    assert got[0].leaf_hash == "0x" + envelope_leaf(records[0].envelope).hex()
    assert got[0].node_id == SIGNER.node_id
    assert ledger.oldest_unbatched_unix_ms() is not None


def test_create_batch_assigns_members_and_refuses_batched_ones(ledger: Ledger) -> None:
    _stored(ledger, 3)
    node = SIGNER.node_id
    batch_id = ledger.create_batch(
        "0x" + "11" * 32,
        [
            BatchMember("req-000", node, 1, "0x" + "a1" * 32),
            BatchMember("req-001", node, 0, "0x" + "a0" * 32),
        ],
    )
    assert [r.request_id for r in ledger.unbatched(10)] == ["req-002"]
    assert ledger.unbatched_count() == 1
    assert ledger.batch_leaves(batch_id) == ["0x" + "a0" * 32, "0x" + "a1" * 32]
    built = ledger.batch(batch_id)
    assert (built.root, built.count, built.status, built.tx_hash) == (
        "0x" + "11" * 32,
        2,
        "built",
        None,
    )

    with pytest.raises(BatchConflictError):  # req-001 is already in a batch
        ledger.create_batch(
            "0x" + "22" * 32,
            [
                BatchMember("req-002", node, 0, "0x" + "b0" * 32),
                BatchMember("req-001", node, 1, "0x" + "b1" * 32),
            ],
        )
    with pytest.raises(BatchConflictError):  # no such record
        ledger.create_batch("0x" + "33" * 32, [BatchMember("req-999", node, 0, "0x" + "c0" * 32)])
    with pytest.raises(BatchConflictError):  # same root as a stored batch
        ledger.create_batch("0x" + "11" * 32, [BatchMember("req-002", node, 0, "0x" + "d0" * 32)])
    # Nothing of the failed attempts remains: no batch row, req-002 still unbatched.
    assert [b.id for b in ledger.open_batches()] == [batch_id]
    assert [r.request_id for r in ledger.unbatched(10)] == ["req-002"]
    ((unbatched, no_batch, no_index, leaf),) = ledger.record_batch("req-002")
    assert (unbatched.request_id, no_batch, no_index) == ("req-002", None, None)
    assert leaf == "0x" + envelope_leaf(unbatched.envelope).hex()  # kept since insert


def test_open_batches_and_mark_anchored(ledger: Ledger) -> None:
    _stored(ledger, 2)
    node = SIGNER.node_id
    first = ledger.create_batch(
        "0x" + "01" * 32, [BatchMember("req-000", node, 0, "0x" + "a0" * 32)]
    )
    second = ledger.create_batch(
        "0x" + "02" * 32, [BatchMember("req-001", node, 0, "0x" + "b0" * 32)]
    )
    assert [b.id for b in ledger.open_batches()] == [first, second]

    tx = "0x" + "ab" * 32
    ledger.mark_anchored(first, tx, block_number=12, gas_used=45_000, batch_index=0)
    ledger.mark_anchored(first, tx, block_number=12, gas_used=45_000, batch_index=0)  # no-op
    assert [b.id for b in ledger.open_batches()] == [second]
    anchored = ledger.batch(first)
    assert anchored.status == "anchored"
    assert (anchored.tx_hash, anchored.block_number, anchored.gas_used, anchored.batch_index) == (
        tx,
        12,
        45_000,
        0,
    )
    assert anchored.anchored_unix_ms is not None
    with pytest.raises(LedgerError, match="already anchored"):
        ledger.mark_anchored(first, "0x" + "cd" * 32, 13, 45_000, 1)
    with pytest.raises(BatchNotFoundError):
        ledger.mark_anchored(9_999, tx, 1, 1, 1)
    with pytest.raises(BatchNotFoundError):
        ledger.batch(9_999)


def test_batch_proofs_from_stored_leaves(ledger: Ledger) -> None:
    """The batcher's round trip: leaves → tree → create_batch; later, proof from the ledger."""
    _stored(ledger, 7)
    ledger.store(_accepted(_record("req-003", OTHER, payer="bob")))
    pending = ledger.unbatched(100)
    leaves = {(r.request_id, r.node_id): bytes.fromhex(r.leaf_hash[2:]) for r in pending}
    tree = MerkleTree(leaves.values())
    members = [
        BatchMember(rid, nid, tree.index_of(leaf), "0x" + leaf.hex())
        for (rid, nid), leaf in leaves.items()
    ]
    batch_id = ledger.create_batch("0x" + tree.root.hex(), members)

    assert ledger.batch_leaves(batch_id) == ["0x" + leaf.hex() for leaf in tree.leaves]
    rebuilt = MerkleTree(bytes.fromhex(h[2:]) for h in ledger.batch_leaves(batch_id))
    entries = ledger.record_batch("req-003")
    assert len(entries) == 2
    for record, batch, leaf_index, leaf_hex in entries:
        assert batch is not None and batch.id == batch_id and leaf_hex is not None
        leaf = envelope_leaf(record.envelope)
        assert leaf_hex == "0x" + leaf.hex()
        assert rebuilt.leaves[leaf_index or 0] == leaf
        assert verify_proof(bytes.fromhex(batch.root[2:]), leaf, rebuilt.proof(leaf))


# --- factory and throughput ------------------------------------------------------------------


def test_open_ledger_urls(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/a.sqlite3", str(tmp_path / "b.sqlite3")):
        db = open_ledger(url)
        assert isinstance(db, SqliteLedger)
        db.close()
    assert (tmp_path / "a.sqlite3").exists() and (tmp_path / "b.sqlite3").exists()
    with pytest.raises(ValueError, match="unsupported"):
        open_ledger("mysql://localhost/x")


@pytest.mark.postgres
def test_open_ledger_postgres_schema_parameter() -> None:
    schema = "t_" + uuid.uuid4().hex[:12]
    try:
        db = open_ledger(f"{PG_DSN}?connect_timeout=5&schema={schema}")
        assert isinstance(db, PostgresLedger)
        db.store(_accepted(_record()))
        db.close()
        with psycopg.connect(PG_DSN) as conn:
            query = sql.SQL("SELECT COUNT(*) FROM {}.records").format(sql.Identifier(schema))
            assert conn.execute(query).fetchone() == (1,)
    finally:
        _drop_schema(schema)


def test_store_throughput_smoke(ledger: Ledger, backend: str) -> None:
    """Not a timed assertion: prints the rate (run with -s)."""
    records = [_record(f"req-t-{i:05d}") for i in range(5_000)]
    start = time.perf_counter()
    for i in range(0, len(records), 500):
        assert ledger.store(_accepted(*records[i : i + 500])).inserted == 500
    elapsed_s = time.perf_counter() - start
    assert ledger.count() == 5_000
    print(
        f"\n{backend}: stored 5,000 records in batches of 500: {5_000 / elapsed_s:,.0f} records/s"
    )
