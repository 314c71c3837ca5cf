"""ZKML end to end on the real broker, and the ledger's proofs table on both backends.

A ZKML request: the signed reply comes first; the proof, made in the worker's prover child
process, follows on the settlement topic; the in-process settlement service verifies it
(SNARK in its own child process) and the ledger shows it verified, linked to the result.
Re-signed forgeries (another output hash, swapped public outputs, a valid proof of another
result) are rejected. Circuit artifacts are prepared once per module, through the worker's
start-up path (``prepare_circuits``, in a child process).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from nacl.public import PrivateKey
from psycopg import sql

from client import InferenceClient, build_request, verify_result
from infra.dev.broker import BrokerProcess
from infra.kafka.client import ClusterKafka
from schemas import InferenceResult, MLInput, Tensor, Topics, VerificationMode, encode
from schemas.proofs import PROOF_DOMAIN, ProofClaims, ProofRecord
from schemas.requests import input_hash
from schemas.results import MLOutput, Usage, output_hash
from schemas.settlement import SettlementRecord
from settlement.app import SettlementService
from settlement.ledger import Accepted, Ledger, Origin, PostgresLedger, ProofEntry, SqliteLedger
from settlement.settings import ProofSettings, SettlementSettings
from tests.harness.admission import AdmissionFile, trust_in
from tests.harness.nodes import TestNode
from tests.harness.support import eventually, fast_kafka, read_topic, register_node
from worker.app import compose_intake
from worker.intake import Intake, IntakeConfig
from worker.modelstore.service import build_engines, open_cache
from worker.modelstore.settings import CacheSettings
from worker.pipeline import Pipeline
from worker.zkml import (
    CircuitOptions,
    PreparedCircuit,
    ZkmlModeHandler,
    ZkSettings,
    export_verifier,
    prepare_circuits,
    proof_publisher,
)

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
NODE = TestNode.seeded(9)
SIGNER = NODE.signer


@pytest.fixture(scope="module")
def zk_env(
    demo_hub: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ZkSettings, Path, PreparedCircuit, Path]:
    """(worker zk settings, model cache dir, prepared circuit, settlement vk store)."""
    cache_dir = tmp_path_factory.mktemp("zk-cache")
    settings = ZkSettings(
        enabled=True, allow_dev_srs=True, circuit=CircuitOptions(scales=[7]), queue_size=8
    )
    cache = open_cache(demo_hub, cache_dir, CacheSettings())
    circuits = asyncio.run(prepare_circuits(settings, cache, ["demo-mlp", "demo-lm"], cache_dir))
    assert list(circuits) == ["demo-mlp"]  # the LM is not ONNX: served without ZKML
    store = tmp_path_factory.mktemp("vk-store")
    export_verifier(circuits["demo-mlp"], store)
    return settings, cache_dir, circuits["demo-mlp"], store


# --- end to end on the broker ------------------------------------------------------------------


@pytest.fixture
def settlement_settings(
    broker: BrokerProcess,
    namespace: str,
    tmp_path: Path,
    zk_env: tuple[ZkSettings, Path, PreparedCircuit, Path],
    admission: AdmissionFile,
) -> SettlementSettings:
    return SettlementSettings(
        namespace=namespace,
        kafka=fast_kafka(broker.bootstrap),
        group_id=f"{namespace}-settlement",
        ledger_url=str(tmp_path / "ledger.sqlite3"),
        zk=ProofSettings(vk_store_dir=zk_env[3], allow_dev_srs=True),
        admission=admission.settings(),
    )


def _ml(x: list[float]) -> MLInput:
    return MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=x)})


async def _start_worker(
    broker: BrokerProcess, namespace: str, demo_hub: Path, zk_env: Any, producer: Any
) -> tuple[Intake, ZkmlModeHandler, Any, asyncio.Task[None], dict[str, Any]]:
    """The worker as ``Worker.setup`` composes it, with the ZKML mode plugged in."""
    zk, cache_dir, _, _ = zk_env
    topics = Topics(namespace)
    cache = open_cache(demo_hub, cache_dir, CacheSettings())
    engines = await build_engines(cache, ["demo-mlp", "demo-lm"], CacheSettings())
    # Built piece by piece here, so register as Worker.setup would (settlement requires it).
    await register_node(
        broker.bootstrap,
        topics.registry,
        NODE,
        models={name: engine.model_digest for name, engine in engines.items()},
        modes=(VerificationMode.VANILLA, VerificationMode.ZKML),
    )
    circuits = await prepare_circuits(zk, cache, list(engines), cache_dir)  # cached: fast
    handler = ZkmlModeHandler(circuits, SIGNER, proof_publisher(producer, topics), zk)
    handler.start()
    pipeline = Pipeline(engines, SIGNER, NODE.chain, modes={VerificationMode.ZKML: handler})
    kafka = ClusterKafka(fast_kafka(broker.bootstrap))
    consumer = kafka.consumer(f"{namespace}-workers")
    intake = compose_intake(
        consumer,
        producer,
        pipeline,
        topics,
        IntakeConfig(),
        dlq_key=PrivateKey.generate().public_key,
    )
    consumer.subscribe([topics.infer(m) for m in engines], intake.rebalance_listener())
    await consumer.start()
    return intake, handler, consumer, asyncio.create_task(intake.run()), engines


def _resign(record: ProofRecord, **changes: Any) -> bytes:
    claims = ProofClaims.model_validate({**record.claims.model_dump(mode="json"), **changes})
    return encode(ProofRecord(claims=claims, signature=SIGNER.sign(PROOF_DOMAIN, claims)))


@pytest.mark.kafka
async def test_zkml_result_first_then_a_verified_proof_and_forgeries_rejected(
    broker: BrokerProcess,
    namespace: str,
    demo_hub: Path,
    zk_env: tuple[ZkSettings, Path, PreparedCircuit, Path],
    running_settlement: SettlementService,
    admission: AdmissionFile,
) -> None:
    admission.admit(NODE.node_id, NODE.chain_address)
    topics = Topics(namespace)
    kafka = fast_kafka(broker.bootstrap)
    producer = ClusterKafka(kafka).producer()
    await producer.start()
    intake, handler, consumer, task, engines = await _start_worker(
        broker, namespace, demo_hub, zk_env, producer
    )
    try:
        zkml = build_request("demo-mlp", _ml([0.5, -1.0, 2.0, 0.25]), mode=VerificationMode.ZKML)
        vanilla = build_request("demo-mlp", _ml([1.0, 0.0, -0.5, 0.75]))
        async with InferenceClient(kafka, topics, admission=admission.settings()) as client:
            replies = await asyncio.wait_for(
                asyncio.gather(*[await client.send(r) for r in (zkml, vanilla)]), 60
            )
        for reply, request in zip(replies, (zkml, vanilla), strict=True):
            assert isinstance(reply, InferenceResult)
            trust = trust_in([(NODE.node_id, NODE.chain_address)])
            assert verify_result(reply, request, trust=trust).ok
        assert replies[0].envelope.mode is VerificationMode.ZKML

        ledger = running_settlement.ledger
        assert ledger is not None
        await eventually(
            lambda: [p["status"] for p in ledger.proofs(zkml.request_id)] == ["verified"], 60
        )
        assert ledger.proofs(vanilla.request_id) == []  # VANILLA: no proof
        assert handler.queue.stats == {"queued": 1, "published": 1}

        # Order on the wire: reply, then the settlement record, then the proof (same key,
        # same partition), each later than the one before.
        reply_msg = next(
            m
            for m in await read_topic(broker.bootstrap, topics.replies)
            if m.key == zkml.request_id.encode()
        )
        settled = await read_topic(broker.bootstrap, topics.settlement)
        mine = [m for m in settled if zkml.request_id.encode() in m.value]
        assert [b'"proof_record"' in m.value for m in mine] == [False, True]
        record_msg, proof_msg = mine
        assert record_msg.partition == proof_msg.partition
        assert record_msg.offset < proof_msg.offset
        assert reply_msg.timestamp <= proof_msg.timestamp
        honest = ProofRecord.model_validate_json(proof_msg.value)
        assert honest.claims.output_hash == replies[0].envelope.output_hash
        assert honest.claims.input_hash == replies[0].envelope.input_hash

        # Forgeries, each signed with the node's own key.
        c = honest.claims
        swapped = [list(reversed(c.public_outputs[0]))]
        output = MLOutput(
            tensors={
                "probabilities": Tensor(
                    dtype="float32", shape=[1, 3], data=[q / 128 for q in swapped[0]]
                )
            }
        )
        forgeries = [
            _resign(honest, output_hash=replies[1].envelope.output_hash),
            _resign(
                honest,
                public_outputs=swapped,
                output=output.model_dump(mode="json"),
                output_hash=output_hash(output),
            ),
            # A valid proof, presented as the proof of the VANILLA result: its hashes differ.
            _resign(honest, request_id=vanilla.request_id),
        ]
        for raw in forgeries:
            await producer.send_and_wait(topics.settlement, raw, key=SIGNER.node_id.encode())
        await eventually(lambda: len(ledger.proofs(vanilla.request_id)) == 1, 60)
        (linked,) = ledger.proofs(vanilla.request_id)
        assert (linked["status"], linked["reason"]) == ("rejected", "result_mismatch")
        await eventually(
            lambda: {"output_hash_mismatch", "bad_proof"} <= set(ledger.rejection_counts()), 60
        )
        counts = ledger.rejection_counts()
        assert counts.get("output_hash_mismatch") == 1 and counts.get("bad_proof") == 1
        (kept,) = ledger.proofs(zkml.request_id)
        assert (kept["status"], kept["reason"]) == ("verified", None)  # never downgraded
        assert ledger.proof_counts() == {"verified": 1, "rejected": 1}
        assert ledger.count() == 2
    finally:
        intake.stop()
        await asyncio.wait_for(task, 30)
        await handler.close(drain_timeout_s=5)
        await consumer.stop()
        await producer.stop()
        for engine in engines.values():
            await engine.close()


# --- the proofs table, both backends -----------------------------------------------------------


def _result(request_id: str, x: float) -> tuple[SettlementRecord, ProofRecord]:
    payload = _ml([x, 0.0, 0.0, 0.0])
    output = MLOutput(tensors={"y": Tensor(dtype="float32", shape=[1], data=[x])})
    envelope = NODE.envelope(
        request_id,
        model_digest="a" * 64,
        mode=VerificationMode.ZKML,
        input_hash=input_hash(payload),
        output_hash=output_hash(output),
        usage=Usage(),
        signed_unix_ms=1_700_000_000_000,
    )
    claims = ProofClaims(
        request_id=request_id,
        node_id=SIGNER.node_id,
        model_id="demo-mlp",
        model_digest="a" * 64,
        input_hash=envelope.input_hash,
        output_hash=envelope.output_hash,
        ezkl_version="23.0.5",
        circuit_digest="b" * 64,
        settings_digest="c" * 64,
        vk_digest="d" * 64,
        srs_label="dev-k11-00000000",
        srs_digest="e" * 64,
        input=payload,
        output=output,
        public_inputs=[[1, 0, 0, 0]],
        public_outputs=[[1]],
        proof="AAAA",
        signed_unix_ms=1_700_000_000_000,
    )
    return (
        NODE.sign(envelope),
        ProofRecord(claims=claims, signature=SIGNER.sign(PROOF_DOMAIN, claims)),
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        db: Ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
        yield db
        db.close()
        return
    schema = "t_" + uuid.uuid4().hex[:12]
    db = PostgresLedger(PG_DSN, schema=schema)
    try:
        yield db
    finally:
        db.close()
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _status(ledger: Ledger, request_id: str) -> tuple[str, str | None]:
    (row,) = ledger.proofs(request_id)
    return row["status"], row["reason"]


def test_proofs_link_to_results_in_either_order(ledger: Ledger) -> None:
    assert isinstance(ledger, SqliteLedger | PostgresLedger) and ledger.schema_version >= 4
    record_a, proof_a = _result("req-a", 0.5)
    record_b, proof_b = _result("req-b", 0.25)
    # Result first, then its proof: verified at once; a redelivery changes nothing.
    ledger.store([Accepted(record_a)])
    ledger.store([], [], [ProofEntry(proof_a, "verified", None, Origin("og.settlement", 0, 1))])
    ledger.store([], [], [ProofEntry(proof_a, "verified", None, Origin("og.settlement", 0, 1))])
    assert _status(ledger, "req-a") == ("verified", None)
    # Proof first: pending until its result arrives.
    ledger.store([], [], [ProofEntry(proof_b, "verified")])
    assert _status(ledger, "req-b") == ("pending", None)
    ledger.store([Accepted(record_b)])
    assert _status(ledger, "req-b") == ("verified", None)
    # The same batch holding both links them too.
    record_c, proof_c = _result("req-c", 0.75)
    ledger.store([Accepted(record_c)], [], [ProofEntry(proof_c, "verified")])
    assert _status(ledger, "req-c") == ("verified", None)
    assert ledger.proof_counts() == {"verified": 3}
    row = ledger.proofs("req-a")[0]
    assert row["output_hash"] == record_a.envelope.output_hash
    assert row["vk_digest"] == "d" * 64 and row["origin"] == "og.settlement/0/1"


def test_a_proof_of_other_hashes_is_a_result_mismatch(ledger: Ledger) -> None:
    record_d, _ = _result("req-d", 0.5)
    _, other = _result("req-d", 0.125)  # same request id, another computation
    ledger.store([Accepted(record_d)], [], [ProofEntry(other, "verified")])
    assert _status(ledger, "req-d") == ("rejected", "result_mismatch")
    record_e, _ = _result("req-e", 0.5)
    _, other_e = _result("req-e", 0.125)
    ledger.store([], [], [ProofEntry(other_e, "verified")])  # proof first
    assert _status(ledger, "req-e") == ("pending", None)
    ledger.store([Accepted(record_e)])
    assert _status(ledger, "req-e") == ("rejected", "result_mismatch")


def test_only_a_better_status_replaces_a_stored_one(ledger: Ledger) -> None:
    record_f, proof_f = _result("req-f", 0.5)
    ledger.store([Accepted(record_f)])
    ledger.store([], [], [ProofEntry(proof_f, "rejected", "dev_srs_refused")])
    assert _status(ledger, "req-f") == ("rejected", "dev_srs_refused")
    ledger.store([], [], [ProofEntry(proof_f, "verified")])
    assert _status(ledger, "req-f") == ("verified", None)
    ledger.store([], [], [ProofEntry(proof_f, "rejected", "bad_proof")])
    assert _status(ledger, "req-f") == ("verified", None)
    assert ledger.proof_counts() == {"verified": 1}
