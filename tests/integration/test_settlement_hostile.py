"""Hostile input to settlement on the real broker: every bad record is rejected with a reason
and counted, never retried forever, and valid records keep flowing around it."""

from __future__ import annotations

import time

import pytest
from aiokafka import AIOKafkaProducer

from infra.dev.broker import BrokerProcess
from schemas import ResultEnvelope, SettlementRecord, Topics, Usage, VerificationMode, encode
from schemas.signing import Signer
from settlement.app import SettlementService
from tests.harness.support import eventually, fast_kafka, register_node

pytestmark = pytest.mark.kafka


def _record(signer: Signer, request_id: str, **env: object) -> SettlementRecord:
    fields: dict[str, object] = {
        "request_id": request_id,
        "model_id": "demo-mlp",
        "model_digest": "ab" * 32,
        "mode": VerificationMode.VANILLA,
        "input_hash": "01" * 32,
        "output_hash": "02" * 32,
        "usage": Usage(),
        "node_id": signer.node_id,
        "signed_unix_ms": time.time_ns() // 1_000_000,
    } | env
    envelope = ResultEnvelope.model_validate(fields)
    return SettlementRecord(envelope=envelope, signature=signer.sign_envelope(envelope))


async def test_hostile_records_rejected_with_reasons_while_valid_ones_flow(
    broker: BrokerProcess, namespace: str, running_settlement: SettlementService
) -> None:
    node, forger = Signer(bytes([3]) * 32), Signer(bytes([4]) * 32)
    stranger = Signer(bytes([5]) * 32)  # signs correctly, but never registered
    await register_node(broker.bootstrap, Topics(namespace).registry, node)
    valid = [_record(node, f"ok-{i}") for i in range(20)]
    genuine = valid[0]
    tampered = genuine.model_copy(
        update={"envelope": genuine.envelope.model_copy(update={"output_hash": "ff" * 32})}
    )
    forged = genuine.model_copy(
        update={"signature": forger.sign_envelope(forger_envelope(genuine, forger))}
    )
    future = _record(node, "late", signed_unix_ms=time.time_ns() // 1_000_000 + 3_600_000)
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
        "future_timestamp": 1,
        "replay": 1,
        "unknown_node": 1,
    }
    await eventually(lambda: ledger.rejection_counts() == expected, timeout_s=30)
    assert ledger.count() == len(valid)
    assert {row["request_id"] for r in valid for row in ledger.get(r.envelope.request_id)} == {
        r.envelope.request_id for r in valid
    }


def forger_envelope(record: SettlementRecord, forger: Signer) -> ResultEnvelope:
    """The genuine envelope re-signed by another key (node_id kept: signature must fail)."""
    return record.envelope.model_copy(update={"node_id": forger.node_id})
