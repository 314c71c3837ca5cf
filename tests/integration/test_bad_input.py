"""Bad input on the real broker: a typed error reply when a reply topic can be read from the
message, otherwise a DLQ entry with its reason; the worker keeps serving either way."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import AIOKafkaProducer
from nacl.public import PrivateKey, SealedBox

from client import InferenceClient, build_request
from infra.dev.broker import BrokerProcess
from infra.kafka.client import ClusterKafka
from schemas import (
    ErrorCode,
    ErrorReply,
    InferenceResult,
    MLInput,
    Tensor,
    Topics,
    encode,
)
from schemas import topics as t
from tests.harness.admission import AdmissionFile
from tests.harness.support import eventually, fast_kafka, read_topic
from worker.app import Worker
from worker.settings import WorkerSettings
from worker.trust.keys import load_or_create_seed

pytestmark = pytest.mark.kafka

CANARY = "canary-7f3a9"


def _valid_ml() -> MLInput:
    return MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[0, 1, 2, 3])})


async def test_bad_messages_get_error_replies_or_dlq_and_serving_continues(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
) -> None:
    topics = Topics(namespace)
    topic = topics.infer("demo-mlp")
    async with InferenceClient(
        fast_kafka(broker.bootstrap), topics, admission=admission.settings()
    ) as client:
        producer = AIOKafkaProducer(**fast_kafka(broker.bootstrap).producer_kwargs())
        await producer.start()
        try:
            invalid_with_id = {"request_id": "bad-1", "reply_to": topics.replies, "model": 5}
            unknown = build_request("demo-mlp", _valid_ml(), request_id="bad-2")
            unknown = unknown.model_copy(update={"model": "not-served", "reply_to": topics.replies})
            wrong_tensor = build_request(
                "demo-mlp",
                MLInput(tensors={"y": Tensor(dtype="float32", shape=[1, 4], data=[0, 1, 2, 3])}),
                request_id="bad-3",
                reply_to=topics.replies,
            )
            expired = build_request(
                "demo-mlp", _valid_ml(), request_id="bad-4", reply_to=topics.replies, deadline_s=-1
            )
            hijack = build_request("demo-mlp", _valid_ml(), request_id="bad-5")
            hijack = hijack.model_copy(update={"reply_to": topics.settlement})
            waiters = {
                rid: client.expect(rid) for rid in ("bad-1", "bad-2", "bad-3", "bad-4", "bad-5")
            }
            await producer.send_and_wait(topic, f"not json {CANARY}".encode())
            await producer.send_and_wait(topic, json.dumps([CANARY]).encode())
            await producer.send_and_wait(topic, json.dumps(invalid_with_id).encode())
            await producer.send_and_wait(topic, encode(unknown))
            await producer.send_and_wait(topic, encode(wrong_tensor))
            await producer.send_and_wait(topic, encode(expired))
            await producer.send_and_wait(topic, encode(hijack))
        finally:
            await producer.stop()

        errors = {rid: await asyncio.wait_for(f, 30) for rid, f in waiters.items()}
        # The worker still serves after all of that.
        good = await client.request(build_request("demo-mlp", _valid_ml()), timeout_s=30)

    assert isinstance(good, InferenceResult)
    expected = {
        "bad-1": ErrorCode.BAD_REQUEST,
        "bad-2": ErrorCode.UNKNOWN_MODEL,
        "bad-3": ErrorCode.BAD_REQUEST,
        "bad-4": ErrorCode.DEADLINE_EXCEEDED,
        "bad-5": ErrorCode.REPLY_TOPIC_REFUSED,  # reply_to named the settlement topic
    }
    for rid, code in expected.items():
        reply = errors[rid]
        assert isinstance(reply, ErrorReply), rid
        assert reply.code == code, (rid, reply)
        assert reply.node_id == running_worker.signer.node_id
    assert "model" in errors["bad-1"].message  # names the invalid field
    assert errors["bad-3"].message == "missing input tensor(s): x"
    assert errors["bad-5"].message == "the reply topic is an internal topic"
    # Only the one good request reached the settlement stream.
    settled = await read_topic(broker.bootstrap, topics.settlement, idle_s=0.3)
    assert [json.loads(m.value)["envelope"]["request_id"] for m in settled] == [good.request_id]

    dlq = []

    async def dlq_has_two() -> bool:
        dlq[:] = await read_topic(broker.bootstrap, topics.dlq, idle_s=0.3)
        return len(dlq) == 2

    await eventually(dlq_has_two)
    box = SealedBox(PrivateKey(load_or_create_seed(worker_settings.key_dir / "dlq_x25519.key")))
    reasons = []
    for message in dlq:
        headers = dict(message.headers)
        reasons.append(headers[t.HEADER_REASON].decode())
        assert headers[t.HEADER_ORIGINAL_TOPIC].decode() == topic
        assert int(headers[t.HEADER_ORIGINAL_OFFSET]) in (0, 1)
        assert headers[t.HEADER_ATTEMPTS] == b"1"
        assert CANARY.encode() not in message.value  # user data never in clear in the DLQ
        entry = json.loads(message.value)
        assert CANARY.encode() in box.decrypt(bytes.fromhex(entry["sealed_payload_hex"]))
    assert sorted(reasons) == ["JSON list where an object was expected", "not UTF-8 JSON"]


async def test_dlq_list_and_replay_carry_attempts_forward(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    worker_settings: WorkerSettings,
) -> None:
    from schemas.dlq import DlqEntry
    from worker.deadletters import list_dlq, replay_dlq

    topics = Topics(namespace)
    settings = fast_kafka(broker.bootstrap)
    kafka = ClusterKafka(settings)
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(topics.infer("demo-mlp"), f"{{broken {CANARY}".encode())
    finally:
        await producer.stop()

    entries: list[dict[str, object]] = []

    async def dlq_has(n: int) -> bool:
        entries[:] = [line.as_dict() for line in await list_dlq(kafka, topics)]
        return len(entries) == n

    await eventually(lambda: dlq_has(1))
    assert entries[0]["attempts"] == 1 and entries[0]["reason"] == "not UTF-8 JSON"
    assert "sealed_payload_hex" not in entries[0]
    assert CANARY not in json.dumps(entries)

    wrong_key = await replay_dlq(kafka, topics, PrivateKey.generate(), None)
    assert [r.as_dict() for r in wrong_key] == [
        {"dlq_offset": 0, "replayed": False, "why": "does not open with this key"}
    ]

    key = PrivateKey(load_or_create_seed(worker_settings.key_dir / "dlq_x25519.key"))
    replayed = await replay_dlq(kafka, topics, key, {0})
    assert [r.as_dict() for r in replayed] == [
        {"dlq_offset": 0, "replayed": True, "to": topics.infer("demo-mlp")}
    ]
    # Still broken, so it comes back, now on its second attempt.
    await eventually(lambda: dlq_has(2))
    assert entries[1]["attempts"] == 2
    assert entries[1]["sha256"] == entries[0]["sha256"]

    # Anyone who can write the DLQ can forge entries: a tombstone, bytes that are not JSON and
    # an entry (sealed to the operator's own key) naming the settlement topic as its origin.
    forged = DlqEntry.model_validate(
        {**json.loads((await _raw_dlq(kafka, topics))[0]), "original_topic": topics.settlement}
    )
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        for value in (None, b"\xff not json", forged.model_dump_json().encode()):
            await producer.send_and_wait(topics.dlq, value, key=b"forged")
    finally:
        await producer.stop()
    await eventually(lambda: dlq_has(5))
    assert [sorted(e) for e in entries[2:4]] == [["dlq_offset", "dlq_partition", "unreadable"]] * 2
    results = {r.dlq_offset: r for r in await replay_dlq(kafka, topics, key, {2, 3, 4})}
    assert not any(r.replayed for r in results.values())
    assert results[4].why == "not a request topic of this namespace"


async def _raw_dlq(kafka: ClusterKafka, topics: Topics) -> list[bytes]:
    return [m.value for m in await read_topic(kafka.settings.bootstrap_servers, topics.dlq)]
