"""A record no client can read (a header key that is not UTF-8) on the real broker: the
consumer port delivers it as an ``UnreadableRecord`` at its offset, loses none of its
neighbours (aiokafka itself drops the records it drained from other partitions in the same
call), and the worker dead-letters it and keeps serving."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from client import InferenceClient, build_request
from infra.dev.broker import BrokerProcess
from infra.kafka.admin import ensure_topics
from infra.kafka.client import ClusterKafka
from infra.kafka.ports import TopicPartition, UnreadableRecord
from infra.kafka.settings import KafkaSettings
from schemas import InferenceResult, MLInput, Tensor, Topics
from schemas.dlq import DlqEntry
from schemas.topics import TopicSpec
from tests.harness.admission import AdmissionFile
from tests.harness.support import eventually, fast_kafka, read_topic
from tests.harness.unreadable import produce_unreadable
from worker.app import Worker

pytestmark = pytest.mark.kafka


async def test_the_consumer_port_delivers_an_unreadable_record_in_place(
    broker: BrokerProcess,
) -> None:
    topic = "t" + uuid.uuid4().hex[:12]
    await ensure_topics(broker.bootstrap, [TopicSpec(topic, 2)])
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"p0-before", partition=0)
        await producer.send_and_wait(topic, b"p1-first", partition=1)
        bad = await produce_unreadable(broker.bootstrap, topic, 0, b"secret")
        await producer.send_and_wait(topic, b"p0-after", partition=0)
        await producer.send_and_wait(topic, b"p1-second", partition=1)
    finally:
        await producer.stop()
    consumer = ClusterKafka(KafkaSettings(bootstrap_servers=broker.bootstrap)).consumer(None)
    await consumer.start()
    got: dict[tuple[int, int], object] = {}
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for _ in range(20):
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for r in records:
                    got[(r.partition, r.offset)] = r
            if len(got) == 5:
                break
    finally:
        await consumer.stop()
    assert sorted(got) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # nothing lost, no repeats
    unreadable = got[(0, bad)]
    assert isinstance(unreadable, UnreadableRecord) and unreadable.value is None
    assert "UTF-8" in unreadable.reason
    assert [getattr(got[k], "value", None) for k in [(0, 0), (0, 2), (1, 0), (1, 1)]] == [
        b"p0-before",
        b"p0-after",
        b"p1-first",
        b"p1-second",
    ]


async def test_a_members_first_fetch_with_an_unreadable_record_loses_no_neighbour(
    broker: BrokerProcess,
) -> None:
    # A group member's first fetch after its assignment starts without fetch positions:
    # records of other partitions drained in the failing call used to be skipped for good.
    # Whether they share that call is a race (about half the time here), hence four rounds.
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap,
        session_timeout_ms=1500,
        heartbeat_interval_ms=500,
        fetch_max_wait_ms=50,
    )
    for _ in range(4):
        topic = "t" + uuid.uuid4().hex[:12]
        await ensure_topics(broker.bootstrap, [TopicSpec(topic, 2)])
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            for i in range(5):
                await producer.send_and_wait(topic, b"p0-%d" % i, partition=0)
            await produce_unreadable(broker.bootstrap, topic, 1, b"secret")
            await producer.send_and_wait(topic, b"p1-after", partition=1)
        finally:
            await producer.stop()
        consumer = ClusterKafka(settings).consumer("g" + uuid.uuid4().hex[:12])
        consumer.subscribe([topic])
        await consumer.start()
        got: set[tuple[int, int]] = set()
        try:
            async with asyncio.timeout(20):
                while len(got) < 7:
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        got.update((r.partition, r.offset) for r in records)
        finally:
            await consumer.stop()
        assert got == {(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)}


async def test_the_worker_dead_letters_it_and_keeps_serving(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    admission: AdmissionFile,
) -> None:
    topics = Topics(namespace)
    ml = MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[1, 2, 3, 4])})
    for partition in range(4):
        await produce_unreadable(broker.bootstrap, topics.infer("demo-mlp"), partition, b"x")
    async with InferenceClient(
        fast_kafka(broker.bootstrap), topics, admission=admission.settings()
    ) as client:
        replies = await asyncio.gather(
            *[client.request(build_request("demo-mlp", ml), timeout_s=30) for _ in range(8)]
        )
    assert all(isinstance(r, InferenceResult) for r in replies)

    async def four_dead_letters() -> bool:
        return len(await read_topic(broker.bootstrap, topics.dlq, idle_s=0.3)) == 4

    await eventually(four_dead_letters, timeout_s=30)
    entries = [
        DlqEntry.model_validate_json(m.value)
        for m in await read_topic(broker.bootstrap, topics.dlq)
    ]
    assert {e.reason for e in entries} == {"record header key is not UTF-8"}
    assert sorted(e.original_partition for e in entries) == [0, 1, 2, 3]
    assert running_worker.intake is not None and running_worker.intake.fatal is None
