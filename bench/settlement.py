"""Settlement throughput: records/s of ``inference-node settlement run`` on SQLite and
PostgreSQL, with one and two consumers in one group, and what verifying a record costs.

Run with ``python -m bench.settlement`` (``--smoke`` for tiny sizes). Real infrastructure: a
Tansu broker started for the run and the local PostgreSQL (a schema per run, dropped after).

1. Service throughput. N settlement records of one node (``tests.harness.nodes.TestNode``:
   signed as a node signs them, ed25519 and EIP-191 over one digest), made and encoded once.
   Per run: a fresh namespace (settlement topic of 4 partitions); the node registered on the
   registry topic and admitted by the run's pinned authority; a fresh ledger; 1 or 2
   ``inference-node settlement run`` processes (same group, anchoring off) started and waited
   for until the group is ``Stable`` with that many members; then the N records are produced
   (acks=all, timed apart) and the run ends when the ledger holds N. Throughput is taken from
   the ledger itself: every record stores the time its batch was received
   (``received_unix_ms``), so records/s = the records of every batch but the last received
   over the span from the first batch's receipt to the last one's. Group joins and process
   start are thereby excluded; verification, the ledger transaction and the offset commit of
   every batch are included.
   Keying: the worker keys settlement records by request id (``WORKER_KEYING``; the intake
   benchmark reads the keying off the worker's own records), so one node's records spread over
   every partition and two consumers can share them. Each configuration is also run keyed by
   node id (the worker's keying before): all of one node's records land on one partition, and
   the second consumer has nothing to do. Configurations: 1 consumer (worker keying),
   2 consumers (worker keying), 2 consumers (the other keying), on each backend, alternating,
   ``--repeats`` times. The headline speedup of two consumers is PostgreSQL's (SQLite is one
   file with one writer at a time).
2. Verification cost per record, on one core, over the same encoded records:
   ``verify_record`` (decode, bounds, ed25519 verify of the envelope digest) and
   ``recover_chain_address`` (the EIP-191 chain signature: keccak + secp256k1 recovery, what
   the node gate compares with the admitted address), and the two signature checks alone.
3. ``ledger.store`` alone (500 verified records per call, as the service calls it) into a
   fresh ledger of each backend: the storage ceiling beside the service figure.

Gas per anchored record is ``bench.settlement_gas``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from bench.chaos_support import Child, fast_kafka, new_namespace, settlement_env
from bench.common import (
    add_run_options,
    cpu_busy,
    results_path,
    spread,
    table,
    write_section,
)
from infra.dev.broker import running_broker
from infra.kafka import KafkaSettings
from schemas import encode
from schemas.settlement import SettlementRecord
from schemas.signing import envelope_digest, recover_chain_address, verify_digest
from schemas.topics import Topics
from schemas.verify.record import RecordRules, Verified, verify_record
from settlement.ledger import Accepted, Origin, open_ledger
from tests.harness.admission import AdmissionFile
from tests.harness.nodes import TestNode

__all__ = ["WORKER_KEYING", "main"]

POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgres")
KEYINGS = ("request_id", "node_id")
WORKER_KEYING = "request_id"
"""How ``worker.publish`` keys settlement records (``bench.intake`` reports what it saw)."""
STORE_BATCH = 500
TARGET_SQLITE_RPS = 5000
NODE = TestNode.seeded(7)


def _records(n: int) -> list[tuple[bytes, bytes, bytes]]:
    """n records of ``NODE``: (request-id key, node-id key, encoded record)."""
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        record = NODE.record(f"bench-{run}-{i:07d}")
        rid = record.envelope.request_id.encode()
        out.append((rid, NODE.node_id.encode(), encode(record)))
    return out


@contextlib.contextmanager
def _ledger_url(backend: str, run: Path) -> Iterator[str]:
    """A fresh, empty ledger of ``backend``; a PostgreSQL schema is dropped afterwards."""
    if backend == "sqlite":
        yield str(run / "ledger.sqlite3")
        return
    name = "bench_" + uuid.uuid4().hex[:10]
    try:
        yield f"{POSTGRES_DSN}?schema={name}"
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _query(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("postgresql://"):
        dsn, schema = url.split("?schema=")
        with psycopg.connect(dsn) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            return list(conn.execute(sql).fetchall())
    with contextlib.closing(sqlite3.connect(f"file:{url}?mode=ro", uri=True, timeout=5)) as db:
        return db.execute(sql).fetchall()


def _count(url: str) -> tuple[int, int]:
    """(records, rejections) in the ledger (0, 0 before it exists)."""
    try:
        ((records,),) = _query(url, "SELECT COUNT(*) FROM records")
        ((rejected,),) = _query(url, "SELECT COUNT(*) FROM rejections")
    except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
        return 0, 0
    return int(records), int(rejected)


def _rate(url: str) -> tuple[float, int]:
    """Records/s from the ledger's batch receipt times (see the module docstring)."""
    batches = sorted(
        (int(t), int(n))
        for t, n in _query(
            url, "SELECT received_unix_ms, COUNT(*) FROM records GROUP BY received_unix_ms"
        )
    )
    span_s = (batches[-1][0] - batches[0][0]) / 1000
    counted = sum(n for _, n in batches[:-1])
    return (counted / span_s if span_s > 0 else float("nan")), len(batches)


async def _register(kafka: KafkaSettings, topics: Topics) -> None:
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        key, value = NODE.registration_message()
        await producer.send_and_wait(topics.registry, value, key=key)
    finally:
        await producer.stop()


async def _produce(kafka: KafkaSettings, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        started = time.perf_counter()
        acks = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*acks)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def _await_group(bootstrap: str, group: str, members: int, timeout_s: float) -> None:
    """Until ``group`` is Stable with ``members`` members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_consumer_groups([group])
            _, _, state, _, _, joined = described[0].groups[0]
            if state == "Stable" and len(joined) == members:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group}: {state}, {len(joined)}/{members} members")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def run_service(
    bootstrap: str,
    work: Path,
    backend: str,
    consumers: int,
    keying: str,
    records: list[tuple[bytes, bytes, bytes]],
    timeout_s: float = 300,
) -> dict[str, Any]:
    """One configuration's run (see the module docstring)."""
    kafka = fast_kafka(bootstrap)
    topics = await new_namespace(bootstrap, "st")
    run = work / topics.namespace
    run.mkdir(parents=True)
    AdmissionFile(run / "admission.json").admit(NODE.node_id, NODE.chain_address)
    await _register(kafka, topics)
    with _ledger_url(backend, run) as url:
        env = settlement_env(bootstrap, topics, run / "ledger.sqlite3")
        env["OG_SETTLEMENT_LEDGER_URL"] = url
        children = [Child("settlement", f"settlement-{i}", env, run) for i in range(consumers)]
        for child in children:
            child.start()
        try:
            for child in children:
                if not await child.wait_ready():
                    raise RuntimeError(f"{child.name} not ready; see {child.log_path}")
            await _await_group(bootstrap, env["OG_SETTLEMENT_GROUP_ID"], consumers, 60)
            messages = [(rid if keying == "request_id" else nid, v) for rid, nid, v in records]
            produce_s = await _produce(kafka, topics.settlement, messages)
            deadline = time.monotonic() + timeout_s
            while True:
                stored, rejected = await asyncio.to_thread(_count, url)
                if rejected:
                    raise RuntimeError(f"{rejected} records rejected; see {run}")
                if stored >= len(records):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{stored}/{len(records)} stored after {timeout_s} s")
                await asyncio.sleep(0.25)
            rate, batches = await asyncio.to_thread(_rate, url)
            partitions = len({p for (p,) in await asyncio.to_thread(_partitions, url)})
        finally:
            for child in children:
                await child.terminate(20)
    crashed = [e.name for c in children for e in c.crashes]
    if crashed:
        raise RuntimeError(f"settlement crashed: {crashed}")
    return {
        "records_per_s": rate,
        "batches": batches,
        "partitions_used": partitions,
        "produce_s": produce_s,
    }


def _partitions(url: str) -> list[tuple[Any, ...]]:
    """The settlement partitions the stored records came from (their origin)."""
    return [
        (origin.rsplit("/", 2)[1],)
        for (origin,) in _query(url, "SELECT DISTINCT origin FROM records")
    ]


# -- verification and storage alone ------------------------------------------------------------


def _per_record_us(fn: Any, items: list[Any]) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - started) / len(items) * 1e6


def verification(raws: list[bytes]) -> tuple[dict[str, float], list[SettlementRecord]]:
    """Microseconds per record of each check (single core); and the verified records."""
    now_ms = time.time_ns() // 1_000_000
    rules = RecordRules()
    outcomes = [verify_record(raw, received_unix_ms=now_ms, rules=rules) for raw in raws[:50]]
    assert all(isinstance(o, Verified) for o in outcomes), outcomes[:1]
    verified: list[Verified] = []

    def check(raw: bytes) -> None:
        outcome = verify_record(raw, received_unix_ms=now_ms, rules=rules)
        assert isinstance(outcome, Verified)
        verified.append(outcome)

    record_us = _per_record_us(check, raws)
    digests = [(v.digest, v.record) for v in verified]
    chain_us = _per_record_us(lambda d: recover_chain_address(d[0], d[1].chain_signature), digests)
    ed_us = _per_record_us(
        lambda d: verify_digest(d[1].envelope.node_id, d[0], d[1].signature), digests
    )
    digest_us = _per_record_us(lambda d: envelope_digest(d[1].envelope), digests)
    return {
        "verify_record_us": record_us,
        "chain_recover_us": chain_us,
        "per_record_us": record_us + chain_us,
        "ed25519_verify_us": ed_us,
        "envelope_digest_us": digest_us,
    }, [v.record for v in verified]


def store_alone(url: str, records: list[SettlementRecord], topic: str) -> float:
    """Records/s of ``ledger.store`` alone, ``STORE_BATCH`` records per call."""
    accepted = [Accepted(r, Origin(topic, 0, i)) for i, r in enumerate(records)]
    ledger = open_ledger(url)
    try:
        started = time.perf_counter()
        for i in range(0, len(accepted), STORE_BATCH):
            ledger.store(accepted[i : i + STORE_BATCH])
        elapsed = time.perf_counter() - started
        if ledger.count() != len(records):
            raise RuntimeError(f"ledger holds {ledger.count()}/{len(records)}")
    finally:
        ledger.close()
    return len(records) / elapsed


# -- the benchmark --------------------------------------------------------------------------------

OTHER_KEYING = KEYINGS[1 - KEYINGS.index(WORKER_KEYING)]
CONFIGS = [(1, WORKER_KEYING), (2, WORKER_KEYING), (2, OTHER_KEYING)]
SMOKE_PLAN = [("sqlite", 1, WORKER_KEYING), ("postgres", 2, WORKER_KEYING)]


def _config_key(consumers: int, keying: str) -> str:
    return f"{consumers}_consumer{'s' if consumers > 1 else ''}_by_{keying}"


def _speedup(medians: dict[str, float], keying: str) -> float | None:
    one, two = medians.get(_config_key(1, WORKER_KEYING)), medians.get(_config_key(2, keying))
    return two / one if one and two else None


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-bench-settlement-"))
    started = time.perf_counter()
    records = _records(args.n)
    sign_s = time.perf_counter() - started
    raws = [raw for _, _, raw in records]
    costs, verified = verification(raws)
    plan = SMOKE_PLAN if args.smoke else [(b, c, k) for b in BACKENDS for c, k in CONFIGS]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {b: {} for b in BACKENDS}
    store: dict[str, list[float]] = {b: [] for b in BACKENDS}
    busy: list[float | None] = []
    with running_broker(log_dir=work) as broker:
        for i in range(args.repeats):
            busy.append(await asyncio.to_thread(cpu_busy))
            for backend, consumers, keying in plan:
                result = await run_service(
                    broker.bootstrap, work, backend, consumers, keying, records
                )
                runs[backend].setdefault(_config_key(consumers, keying), []).append(result)
                print(
                    f"  run {i + 1}/{args.repeats} {backend}, {consumers} consumer(s), "
                    f"keyed by {keying}: {result['records_per_s']:,.0f} records/s "
                    f"({result['partitions_used']} partitions used)",
                    flush=True,
                )
            for backend in BACKENDS:
                run = work / f"store-{backend}-{i}"
                run.mkdir(parents=True)
                with _ledger_url(backend, run) as url:
                    rate = await asyncio.to_thread(store_alone, url, verified, "bench.settlement")
                    store[backend].append(rate)
    medians = {
        b: {c: statistics.median(r["records_per_s"] for r in rs) for c, rs in by.items()}
        for b, by in runs.items()
    }
    return {
        "smoke": args.smoke,
        "records": args.n,
        "repeats": args.repeats,
        "settlement_partitions": 4,
        "record_bytes": round(statistics.mean(len(r) for r in raws)),
        "sign_records_per_s": len(records) / sign_s,
        "worker_keying": WORKER_KEYING,
        "cpu_busy_before": busy,
        "runs": runs,
        "records_per_s_median": medians,
        "two_consumers_speedup": {b: _speedup(medians[b], WORKER_KEYING) for b in BACKENDS},
        "two_consumers_speedup_other_keying": {
            b: _speedup(medians[b], OTHER_KEYING) for b in BACKENDS
        },
        "verification": costs,
        "store_batch": STORE_BATCH,
        "store_records_per_s": store,
        "target_sqlite_records_per_s": TARGET_SQLITE_RPS,
    }


def print_tables(r: dict[str, Any]) -> None:
    print(
        f"\nSettlement service: {r['records']:,} records of {r['record_bytes']} B from one node, "
        f"settlement topic of {r['settlement_partitions']} partitions, {r['repeats']} runs "
        f"(records/s, median (min-max)); the worker keys records by {r['worker_keying']}"
    )
    rows = []
    for backend in BACKENDS:
        by = r["runs"][backend]
        base = r["records_per_s_median"][backend].get(_config_key(1, r["worker_keying"]))
        for consumers, keying in CONFIGS:
            key = _config_key(consumers, keying)
            if key not in by:
                continue
            rates = [x["records_per_s"] for x in by[key]]
            used = sorted({x["partitions_used"] for x in by[key]})
            label = "as the worker" if keying == r["worker_keying"] else "not as the worker"
            rows.append(
                [
                    backend,
                    str(consumers),
                    f"{keying} ({label})",
                    spread(rates),
                    f"{statistics.median(rates) / base:.2f}" if base else "-",
                    "/".join(map(str, used)),
                ]
            )
        rows.append([backend, "-", f"ledger.store alone, {r['store_batch']}/call", "-", "-", "-"])
        rows[-1][3] = spread(r["store_records_per_s"][backend])
    headers = ["ledger", "consumers", "keyed by", "records/s", "vs 1 consumer", "partitions used"]
    print(table(headers, rows))
    v = r["verification"]
    print("\nVerification per record, one core (µs)")
    print(
        table(
            ["check", "µs/record"],
            [
                ["verify_record (decode, bounds, ed25519)", f"{v['verify_record_us']:.1f}"],
                ["recover_chain_address (EIP-191)", f"{v['chain_recover_us']:.1f}"],
                ["both: per record", f"{v['per_record_us']:.1f}"],
                ["  of which ed25519 verify alone", f"{v['ed25519_verify_us']:.1f}"],
                ["  envelope digest (canonical + sha256)", f"{v['envelope_digest_us']:.1f}"],
            ],
        )
    )
    print(f"= {1e6 / v['per_record_us']:,.0f} records/s per core for verification alone")


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """One consumer per backend; the speedup of two is PostgreSQL's (a ledger several
    consumers share; SQLite is one file with one writer at a time: its figure is in the
    section)."""
    one = _config_key(1, r["worker_keying"])
    return {
        "settlement_records_per_s_sqlite": r["records_per_s_median"]["sqlite"].get(one),
        "settlement_records_per_s_postgres": r["records_per_s_median"]["postgres"].get(one),
        "settlement_2_consumers_speedup": r["two_consumers_speedup"]["postgres"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(parser)
    parser.add_argument("--n", type=int, default=20_000, help="records per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeats = 1500, 1
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["runtime_s"] = time.perf_counter() - started
    write_section(results_path(args), "settlement", results, summary(results))
    print_tables(results)
    print(f"\nRuntime {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
