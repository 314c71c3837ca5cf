"""Hostile input to settlement on the real broker: every bad record is rejected with a reason
and counted, never retried forever, and valid records keep flowing around it."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer

from infra.dev.broker import BrokerProcess
from schemas import SettlementRecord, Topics, encode
from schemas.signing import envelope_digest
from settlement.app import SettlementService
from tests.harness.admission import AdmissionFile
from tests.harness.nodes import TestNode
from tests.harness.support import eventually, fast_kafka, register_node

pytestmark = pytest.mark.kafka


def _record(node: TestNode, request_id: str, **env: object) -> SettlementRecord:
    return node.record(request_id, input_hash="01" * 32, output_hash="02" * 32, **env)


async def test_hostile_records_rejected_with_reasons_while_valid_ones_flow(
    broker: BrokerProcess,
    namespace: str,
    running_settlement: SettlementService,
    admission: AdmissionFile,
) -> None:
    node, forger = TestNode.seeded(3), TestNode.seeded(4)
    stranger = TestNode.seeded(5)  # signs correctly, but never registered
    intruder = TestNode.seeded(6)  # registers itself; nobody admitted it
    revoked = TestNode.seeded(7)  # admitted once, then revoked
    registry = Topics(namespace).registry
    for member in (node, intruder, revoked):
        await register_node(broker.bootstrap, registry, member)
    admission.admit_all([(n.node_id, n.chain_address) for n in (node, revoked)])
    admission.revoke(revoked.node_id)
    await asyncio.sleep(1.0)  # settlement refreshes admission facts every 0.3 s
    valid = [_record(node, f"ok-{i}") for i in range(20)]
    genuine = valid[0]
    tampered = genuine.model_copy(
        update={"envelope": genuine.envelope.model_copy(update={"output_hash": "ff" * 32})}
    )
    forged_env = genuine.envelope.model_copy(update={"node_id": forger.node_id})
    forged = genuine.model_copy(update={"signature": forger.signer.sign_envelope(forged_env)})
    other = _record(node, "wrong-chain-key")
    wrong_chain_key = other.model_copy(
        update={"chain_signature": forger.chain.sign_digest(envelope_digest(other.envelope))}
    )
    now = time.time_ns() // 1_000_000
    future = _record(node, "late", signed_unix_ms=now + 3_600_000)
    back_dated = _record(
        revoked, "back-dated", signed_unix_ms=now - 600_000, request_created_unix_ms=now - 600_001
    )
    hostile = [
        b"not json at all",
        b"[" * 100_000,
        b'{"type": "settlement_record"}',
        b"x" * 1_100_000,
        encode(tampered),
        encode(forged),
        encode(future),
        encode(genuine),  # a replay: the same record in a second message
        encode(_record(stranger, "unregistered")),
        encode(_record(intruder, "self-registered")),
        encode(back_dated),  # a revoked key signing "before" its revocation
        encode(wrong_chain_key),
        encode(_record(node, "over", usage={"input_tokens": 1, "output_tokens": 5})),
        encode(_record(node, "old", request_created_unix_ms=now - 30 * 86_400_000)),
    ]
    topic = Topics(namespace).settlement
    big = fast_kafka(broker.bootstrap).model_copy(update={"max_request_size_bytes": 2_000_000})
    producer = AIOKafkaProducer(**big.producer_kwargs())
    await producer.start()
    try:
        for i, record in enumerate(valid):
            await producer.send_and_wait(topic, encode(record), partition=0)
            if i < len(hostile):
                await producer.send_and_wait(topic, hostile[i], partition=0)
    finally:
        await producer.stop()

    ledger = running_settlement.ledger
    assert ledger is not None
    expected = {
        "not_decodable": 4,
        "bad_signature": 2,
        "bad_chain_signature": 1,
        "future_timestamp": 1,
        "replay": 1,
        "unknown_node": 1,
        # the self-registered node, and the revoked one (off the newer list), back-dating or not
        "not_admitted": 2,
        "over_budget": 1,
        "too_old": 1,
    }
    await eventually(lambda: ledger.rejection_counts() == expected, timeout_s=30)
    assert ledger.count() == len(valid)
    assert {row["request_id"] for r in valid for row in ledger.get(r.envelope.request_id)} == {
        r.envelope.request_id for r in valid
    }
