"""The whole path on the real broker: requests → worker → signed replies + settlement ledger."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter

import pytest
import rfc8785
from aiokafka import AIOKafkaProducer

from client import InferenceClient, build_request, verify_result
from infra.dev.broker import BrokerProcess
from schemas import (
    ChatInput,
    ChatMessage,
    InferenceResult,
    MLInput,
    SamplingParams,
    Tensor,
    Topics,
    encode,
)
from schemas.results import ErrorReply
from schemas.verify.result import verify_error
from settlement.app import SettlementService
from tests.harness.admission import AdmissionFile, trust_workers
from tests.harness.support import eventually, fast_kafka, read_topic, settlement_counts
from worker.app import Worker

pytestmark = pytest.mark.kafka

N_PER_MODEL = 100


def _ml(i: int) -> MLInput:
    row = [i / 10, -i / 20, 1.0, float(i % 7)]
    return MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=row)})


def _chat(i: int) -> ChatInput:
    return ChatInput(
        messages=[ChatMessage(role="user", content=f"request number {i}")],
        params=SamplingParams(max_tokens=6, temperature=0.8, seed=i),
    )


async def test_200_requests_answered_once_signed_and_settled_once(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    running_settlement: SettlementService,
    admission: AdmissionFile,
) -> None:
    topics = Topics(namespace)
    requests = [build_request("demo-mlp", _ml(i)) for i in range(N_PER_MODEL)]
    requests += [build_request("demo-lm", _chat(i)) for i in range(N_PER_MODEL)]

    async with InferenceClient(
        fast_kafka(broker.bootstrap), topics, admission=admission.settings()
    ) as client:
        futures = [await client.send(r) for r in requests]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 120)

    by_id = {r.request_id: r for r in requests}
    for reply in replies:
        assert isinstance(reply, InferenceResult), reply
        report = verify_result(reply, by_id[reply.request_id], trust=trust_workers(running_worker))
        assert report.ok, report.as_dict()

    # Exactly once on the reply topic: read it back raw.
    raw_replies = await read_topic(broker.bootstrap, topics.replies)
    counts = Counter(m.key.decode() for m in raw_replies)
    assert set(counts) == set(by_id)
    assert set(counts.values()) == {1}

    ledger = running_settlement.ledger
    assert ledger is not None
    await eventually(lambda: ledger.count() == 2 * N_PER_MODEL)

    # Redeliver every settlement record: the ledger must not grow.
    records = await read_topic(broker.bootstrap, topics.settlement)
    assert len(records) == 2 * N_PER_MODEL
    producer = AIOKafkaProducer(**fast_kafka(broker.bootstrap).producer_kwargs())
    await producer.start()
    try:
        for m in records:
            await producer.send(topics.settlement, m.value, key=m.key)
        await producer.flush()
    finally:
        await producer.stop()
    # Copies in new messages are replays: counted and stored as rejections, never booked.
    await eventually(lambda: settlement_counts(running_settlement)["verified"] == 4 * N_PER_MODEL)
    await eventually(lambda: ledger.rejection_counts() == {"replay": 2 * N_PER_MODEL})
    assert ledger.count() == 2 * N_PER_MODEL
    assert settlement_counts(running_settlement)["rejected"] == 2 * N_PER_MODEL


async def test_minimal_request_from_another_producer_hashes_payload_as_sent(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    admission: AdmissionFile,
) -> None:
    """A producer that omits every optional field can still verify its input hash."""
    topics = Topics(namespace)
    payload = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}]}
    raw = {
        "schema_version": 2,
        "request_id": "minimal-1",
        "model": "demo-lm",
        "created_unix_ms": time.time_ns() // 1_000_000,
        "reply_to": topics.replies,
        "payload": payload,
    }
    async with InferenceClient(
        fast_kafka(broker.bootstrap), topics, admission=admission.settings()
    ) as client:
        waiter = client.expect("minimal-1")
        producer = AIOKafkaProducer(**fast_kafka(broker.bootstrap).producer_kwargs())
        await producer.start()
        try:
            await producer.send_and_wait(topics.infer("demo-lm"), json.dumps(raw).encode())
        finally:
            await producer.stop()
        reply = await asyncio.wait_for(waiter, 30)
    assert isinstance(reply, InferenceResult)
    expected = hashlib.sha256(rfc8785.dumps(payload)).hexdigest()
    assert reply.envelope.input_hash == expected


async def test_request_redelivered_to_the_same_worker_is_answered_once(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    admission: AdmissionFile,
) -> None:
    topics = Topics(namespace)
    request = build_request("demo-mlp", _ml(3), reply_to=topics.replies)
    follow_up = build_request("demo-mlp", _ml(4), reply_to=topics.replies)
    async with InferenceClient(
        fast_kafka(broker.bootstrap), topics, admission=admission.settings()
    ) as client:
        first = client.expect(request.request_id)
        second = client.expect(follow_up.request_id)
        producer = AIOKafkaProducer(**fast_kafka(broker.bootstrap).producer_kwargs())
        await producer.start()
        try:
            # Same partition (same key): the copy is fetched with the original, while it is
            # still in flight, and must be dropped all the same.
            for r in (request, request, follow_up):
                await producer.send_and_wait(
                    topics.infer("demo-mlp"), encode(r), key=request.request_id.encode()
                )
        finally:
            await producer.stop()
        assert isinstance(await asyncio.wait_for(first, 30), InferenceResult)
        assert isinstance(await asyncio.wait_for(second, 30), InferenceResult)
    replies = await read_topic(broker.bootstrap, topics.replies)
    keys = [m.key.decode() for m in replies]
    assert keys.count(request.request_id) == 1
    assert keys.count(follow_up.request_id) == 1


async def test_another_request_reusing_an_id_gets_duplicate_request_never_silence(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    admission: AdmissionFile,
) -> None:
    # Someone reuses a request id with other content, on the same model or another one: the
    # first is answered, the second gets a typed error (its sender is told), nothing is booked
    # twice and nothing is dropped without a word.
    topics = Topics(namespace)
    original = build_request("demo-mlp", _ml(5), reply_to=topics.replies)
    same_model = original.model_copy(update={"payload": _ml(6)})
    other_model = build_request(
        "demo-lm", _chat(7), reply_to=topics.replies, request_id=original.request_id
    )
    producer = AIOKafkaProducer(**fast_kafka(broker.bootstrap).producer_kwargs())
    await producer.start()
    try:
        key = original.request_id.encode()
        await producer.send_and_wait(topics.infer("demo-mlp"), encode(original), key=key)
        await asyncio.sleep(1.0)  # answered first
        await producer.send_and_wait(topics.infer("demo-mlp"), encode(same_model), key=key)
        await producer.send_and_wait(topics.infer("demo-lm"), encode(other_model), key=key)
    finally:
        await producer.stop()

    async def three_answers() -> bool:
        return len(await read_topic(broker.bootstrap, topics.replies, idle_s=0.3)) >= 3

    await eventually(three_answers, timeout_s=30)
    docs = [json.loads(m.value) for m in await read_topic(broker.bootstrap, topics.replies)]
    assert [d["type"] for d in docs].count("result") == 1
    errors = [d for d in docs if d["type"] == "error"]
    assert [e["code"] for e in errors] == ["duplicate_request", "duplicate_request"]
    trust = trust_workers(running_worker)
    for error in errors:
        assert verify_error(ErrorReply.model_validate(error), trust=trust).ok
    settled = await read_topic(broker.bootstrap, topics.settlement, idle_s=0.3)
    assert len(settled) == 1
