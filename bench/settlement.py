"""Settlement benchmarks: verify + store throughput of the real service, and gas per record.

Run with ``python -m bench.settlement``. Everything runs against real infrastructure started
for the run (a Tansu broker, anvil, the local PostgreSQL) and stopped at the end.

1. Verify + store throughput. N signed settlement records (two node keys, ed25519, keyed by
   node id as the worker produces them) are pre-produced once to a fresh namespace's
   settlement topic. For each repeat and each ledger backend (SQLite in a temp file,
   PostgreSQL in a unique schema dropped afterwards) a fresh ``SettlementService`` (anchoring
   off, default ``max_batch`` 500) runs in-process under a fresh consumer group and consumes
   the whole topic. The instance's ``_settle`` (verify every record, ``ledger.store`` in one
   transaction, commit offsets) is wrapped with a timer: throughput is the records stored
   after the first ``_settle`` call completed divided by the time from that completion to the
   completion of the call that brought the ledger to N. The consumer-group join and the first
   fetch are thereby excluded; fetches between batches are included.
   For context, the two stages alone on the same records: ``verify_record`` over the N raw
   messages in a loop (single core), and ``ledger.store`` of the verified records in batches
   of 500 (with origins, as the service calls it) into a fresh ledger of each backend.
2. Gas per settled record. On anvil with a freshly deployed Settlement contract: one
   single-record batch first (the first batch in a contract also pays the zero → non-zero
   write of ``batchCount``), then one more single-record batch — the baseline of anchoring
   every record with its own ``settleBatch`` transaction — then one batch each of 100, 1,000
   and 10,000 real leaves (``envelope_leaf`` of distinct records, tree built by
   ``MerkleTree``). Reported: ``gas_used`` from the receipt, gas per record, the batch's gas
   as a fraction of ``size`` single-record transactions, and the time to hash the leaves and
   build the tree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from pydantic import SecretStr

from bench.intake import table
from infra.dev.anvil import DEV_ACCOUNTS, dev_private_key, running_anvil
from infra.dev.broker import running_broker
from infra.kafka import KafkaSettings
from infra.kafka.admin import ensure_topics
from schemas import ResultEnvelope, SettlementRecord, Usage, VerificationMode, encode
from schemas.merkle import MerkleTree, envelope_leaf
from schemas.registry import RegisteredModel
from schemas.signing import Signer
from schemas.topics import Topics, standard_topics
from schemas.verify.record import Verified, verify_record
from settlement.app import SettlementService
from settlement.chain import ChainSettings, SettlementChain
from settlement.ledger import open_ledger
from settlement.settings import SettlementSettings
from worker.registration import Registrar

RESULTS = Path(__file__).with_name("results.json")
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
STORE_BATCH = 500
TARGET_SQLITE_RPS = 5000
GAS_SIZES = (100, 1_000, 10_000)
MAX_CLOCK_SKEW_S = 300.0


def _kafka(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap, session_timeout_ms=3000, heartbeat_interval_ms=500
    )


SIGNERS = [Signer(bytes([i]) * 32) for i in (1, 2)]


async def _register(kafka: KafkaSettings, topics: Topics) -> None:
    """Register the two node keys as their workers would: settlement requires it."""
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        for signer in SIGNERS:
            registrar = Registrar(
                producer,
                topics.registry,
                signer,
                x25519_public_key="00" * 32,
                chain_address="0x" + "00" * 20,
                models=[
                    RegisteredModel(
                        name="demo-mlp", digest="ab" * 32, modes=[VerificationMode.VANILLA]
                    )
                ],
                attestation=None,
                interval_s=3600,
            )
            await registrar.publish()
    finally:
        await producer.stop()


def _records(n: int) -> list[SettlementRecord]:
    """n signed records from two node keys, as a worker would produce them."""
    signers = SIGNERS
    now_ms = time.time_ns() // 1_000_000
    records = []
    for i in range(n):
        signer = signers[i % 2]
        envelope = ResultEnvelope(
            request_id=f"bench-{uuid.uuid4().hex}",
            model_id="demo-mlp",
            model_digest="ab" * 32,
            mode=VerificationMode.VANILLA,
            input_hash=f"{i:064x}",
            output_hash=f"{i + 1:064x}",
            usage=Usage(input_tokens=4, output_tokens=1),
            payer="acct-1",
            node_id=signer.node_id,
            signed_unix_ms=now_ms,
        )
        records.append(
            SettlementRecord(envelope=envelope, signature=signer.sign_envelope(envelope))
        )
    return records


async def _produce(kafka: KafkaSettings, topic: str, raws: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        for key, value in raws:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


@contextlib.contextmanager
def _ledger_url(backend: str, work: Path) -> Iterator[str]:
    """A fresh, empty ledger of ``backend``; a PostgreSQL schema is dropped afterwards."""
    name = "bench_" + uuid.uuid4().hex[:10]
    if backend == "sqlite":
        yield str(work / f"{name}.sqlite3")
        return
    try:
        yield f"{POSTGRES_DSN}?schema={name}"
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def run_service(
    kafka: KafkaSettings, topics: Topics, ledger_url: str, n: int, timeout_s: float = 120
) -> float:
    """Records/s of the real service path (see the module docstring)."""
    settings = SettlementSettings(
        namespace=topics.namespace,
        kafka=kafka,
        group_id=f"{topics.namespace}-{uuid.uuid4().hex[:6]}",
        ledger_url=ledger_url,
        anchor=False,
        max_clock_skew_s=MAX_CLOCK_SKEW_S,
    )
    service = SettlementService(settings)
    settle = service._settle
    marks: list[tuple[float, int]] = []  # (completion time, stored so far) per _settle call

    async def timed_settle(batches: Any) -> None:
        await settle(batches)
        marks.append((time.perf_counter(), service.stored))

    service._settle = timed_settle  # type: ignore[method-assign]
    task: asyncio.Task[None] | None = None
    try:
        await service.setup()
        task = asyncio.create_task(service.run())
        deadline = time.monotonic() + timeout_s
        while service.stored < n:
            if task.done():
                task.result()  # raises what the service died of
                raise RuntimeError("settlement service stopped early")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service.stored}/{n} records stored after {timeout_s} s")
            await asyncio.sleep(0.02)
        assert service.ledger is not None
        stored = await asyncio.to_thread(service.ledger.count)
        if stored != n or service.rejected:
            raise RuntimeError(f"ledger holds {stored}/{n}, {service.rejected} rejected")
    finally:
        service.stop()
        if task is not None:
            await task
        await service.close()
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    return (s1 - s0) / (t1 - t0)


def run_verify(raws: list[bytes]) -> tuple[float, list[SettlementRecord]]:
    """Records/s of ``verify_record`` alone, and the verified records."""
    start = time.perf_counter()
    outcomes = [verify_record(raw, max_clock_skew_s=MAX_CLOCK_SKEW_S) for raw in raws]
    elapsed = time.perf_counter() - start
    verified = [o.record for o in outcomes if isinstance(o, Verified)]
    if len(verified) != len(raws):
        raise RuntimeError(f"{len(raws) - len(verified)} records rejected")
    return len(raws) / elapsed, verified


def run_store(ledger_url: str, records: list[SettlementRecord], origins: list[str]) -> float:
    """Records/s of ``ledger.store`` alone, STORE_BATCH records per call, fresh ledger."""
    ledger = open_ledger(ledger_url)
    try:
        start = time.perf_counter()
        for i in range(0, len(records), STORE_BATCH):
            ledger.store(records[i : i + STORE_BATCH], [], origins[i : i + STORE_BATCH])
        elapsed = time.perf_counter() - start
        if ledger.count() != len(records):
            raise RuntimeError(f"ledger holds {ledger.count()}/{len(records)}")
    finally:
        ledger.close()
    return len(records) / elapsed


async def run_gas(rpc_url: str, records: list[SettlementRecord]) -> dict[str, Any]:
    """Gas of single-record batches and of batches of GAS_SIZES real leaves."""
    settings = ChainSettings(rpc_url=rpc_url, relayer_key=SecretStr(dev_private_key(0)))
    address = await SettlementChain.deploy(settings, DEV_ACCOUNTS[0])
    chain = await SettlementChain.connect(settings.model_copy(update={"contract_address": address}))
    try:

        async def settle(leaves: list[bytes], ref: int) -> tuple[int, float]:
            start = time.perf_counter()
            tree = MerkleTree(leaves)
            tree_ms = (time.perf_counter() - start) * 1000
            anchored = await chain.settle_batch(tree.root, len(tree), ref.to_bytes(32, "big"))
            return anchored.gas_used, tree_ms

        # Distinct single leaves (records from the end, the sized batches use the start).
        first_gas, _ = await settle([envelope_leaf(records[-1].envelope)], 1)
        single_gas, _ = await settle([envelope_leaf(records[-2].envelope)], 2)
        batches = []
        for ref, size in enumerate(GAS_SIZES, start=3):
            start = time.perf_counter()
            leaves = [envelope_leaf(r.envelope) for r in records[:size]]
            leaves_ms = (time.perf_counter() - start) * 1000
            gas, tree_ms = await settle(leaves, ref)
            batches.append(
                {
                    "size": size,
                    "gas_used": gas,
                    "gas_per_record": gas / size,
                    "vs_per_record_tx": gas / (single_gas * size),
                    "leaves_ms": leaves_ms,
                    "tree_ms": tree_ms,
                }
            )
    finally:
        await chain.close()
    return {"first_batch_gas": first_gas, "single_record_gas": single_gas, "batches": batches}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-bench-settlement-"))
    n = args.n
    start = time.perf_counter()
    records = _records(max(n, *GAS_SIZES, 2))
    sign_s = time.perf_counter() - start
    raws = [encode(r) for r in records[:n]]
    keyed = [(r.envelope.node_id.encode(), raw) for r, raw in zip(records, raws, strict=False)]
    results: dict[str, Any] = {
        "records": n,
        "repeats": args.repeats,
        "node_keys": 2,
        "record_bytes": int(statistics.mean(len(raw) for raw in raws)),
        "sign_rps": len(records) / sign_s,
    }
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(running_broker(log_dir=work))
        kafka = _kafka(broker.bootstrap)
        topics = Topics("s" + uuid.uuid4().hex[:10])
        await ensure_topics(broker.bootstrap, standard_topics(topics.namespace, []))
        await _register(kafka, topics)
        await _produce(kafka, topics.settlement, keyed)

        service: dict[str, list[float]] = {"sqlite": [], "postgres": []}
        verify: list[float] = []
        store: dict[str, list[float]] = {"sqlite": [], "postgres": []}
        verified: list[SettlementRecord] = []
        origins = [f"{topics.settlement}/0/{i}" for i in range(n)]
        for _ in range(args.repeats):
            for backend in ("sqlite", "postgres"):
                with _ledger_url(backend, work) as url:
                    service[backend].append(await run_service(kafka, topics, url, n))
            rate, verified = run_verify(raws)
            verify.append(rate)
            for backend in ("sqlite", "postgres"):
                with _ledger_url(backend, work) as url:
                    rate = await asyncio.to_thread(run_store, url, verified, origins)
                    store[backend].append(rate)
        results["service_rps"] = service
        results["service_rps_median"] = {b: statistics.median(r) for b, r in service.items()}
        results["verify_rps"] = verify
        results["verify_rps_median"] = statistics.median(verify)
        results["store_batch"] = STORE_BATCH
        results["store_rps"] = store
        results["store_rps_median"] = {b: statistics.median(r) for b, r in store.items()}
        results["target_sqlite_rps"] = TARGET_SQLITE_RPS

        anvil = stack.enter_context(running_anvil(log_dir=work))
        results["gas"] = await run_gas(anvil.rpc_url, records)
    return results


def _runs(rates: list[float]) -> str:
    return ", ".join(f"{r:.0f}" for r in rates)


def print_tables(results: dict[str, Any]) -> None:
    service, store = results["service_rps_median"], results["store_rps_median"]
    sqlite = service["sqlite"]
    verdict = "met" if sqlite >= results["target_sqlite_rps"] else "NOT met"
    print(
        f"\nSettlement verify + store: {results['records']} records "
        f"({results['record_bytes']} B each, {results['node_keys']} node keys), "
        f"{results['repeats']} runs"
    )
    print(
        table(
            ["path", "ledger", "records/s (median)", "runs"],
            [
                [
                    "service (verify + store + commit)",
                    "SQLite",
                    f"{sqlite:.0f}",
                    _runs(results["service_rps"]["sqlite"]),
                ],
                [
                    "service (verify + store + commit)",
                    "PostgreSQL",
                    f"{service['postgres']:.0f}",
                    _runs(results["service_rps"]["postgres"]),
                ],
                [
                    "verify_record alone (1 core)",
                    "-",
                    f"{results['verify_rps_median']:.0f}",
                    _runs(results["verify_rps"]),
                ],
                [
                    f"ledger.store alone ({results['store_batch']}/call)",
                    "SQLite",
                    f"{store['sqlite']:.0f}",
                    _runs(results["store_rps"]["sqlite"]),
                ],
                [
                    f"ledger.store alone ({results['store_batch']}/call)",
                    "PostgreSQL",
                    f"{store['postgres']:.0f}",
                    _runs(results["store_rps"]["postgres"]),
                ],
                [
                    "target: service on SQLite",
                    "SQLite",
                    f">= {results['target_sqlite_rps']}",
                    verdict,
                ],
            ],
        )
    )
    gas = results["gas"]
    single = gas["single_record_gas"]
    print("\nGas per settled record (anvil, one settleBatch per batch root)")
    rows = [["1 (one tx per record)", f"{single}", f"{single}", "100%", "-", "-"]]
    rows += [
        [
            f"{b['size']:,}",
            f"{b['gas_used']}",
            f"{b['gas_per_record']:.1f}",
            f"{b['vs_per_record_tx']:.4%}",
            f"{b['leaves_ms']:.1f}",
            f"{b['tree_ms']:.1f}",
        ]
        for b in gas["batches"]
    ]
    print(
        table(
            [
                "batch size",
                "gas_used",
                "gas/record",
                "vs one tx per record",
                "leaf hashing ms",
                "tree build ms",
            ],
            rows,
        )
    )
    print(
        f"First batch in a fresh contract: {gas['first_batch_gas']} gas "
        f"(+{gas['first_batch_gas'] - single} for batchCount 0 -> 1); not used as the baseline."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["runtime_s"] = time.perf_counter() - started
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing["settlement"] = results
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print_tables(results)
    print(f"\nRuntime {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
