"""The Kafka ports' contract: one scenario class, run in memory and on the real broker.

``KafkaPortsContract`` holds the scenarios (faststream's ``BrokerRealConsumeTestcase``
pattern); ``TestMemoryKafka`` runs them on ``infra.kafka.memory.MemoryKafka`` in milliseconds,
``TestClusterKafka`` on Tansu through ``infra.kafka.client.ClusterKafka``. A scenario that
passes on one and fails on the other is a bug in the memory cluster or in the adapter.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest

from infra.dev.broker import BrokerProcess
from infra.kafka.admin import ensure_topics
from infra.kafka.client import ClusterKafka
from infra.kafka.memory import MemoryKafka, murmur2
from infra.kafka.ports import (
    BrokerUnavailable,
    CommitFailed,
    Consumer,
    Kafka,
    KafkaPortError,
    MessageTooLarge,
    Producer,
    Record,
    TopicPartition,
)
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicSpec

MAX_MESSAGE_BYTES = 65_536
NewTopic = Callable[[int], Awaitable[str]]
Event = tuple[str, str, frozenset[TopicPartition]]


class Recorder:
    def __init__(self, name: str, events: list[Event]) -> None:
        self.name = name
        self.events = events

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.events.append((self.name, "revoked", frozenset(revoked)))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.events.append((self.name, "assigned", frozenset(assigned)))


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def all_of(topic: str, partitions: int) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(topic, p) for p in range(partitions))


async def read(consumer: Consumer, count: int, *, timeout_s: float = 10.0) -> list[Record]:
    """Fetch until ``count`` records arrived (fails after ``timeout_s``)."""
    records: list[Record] = []
    async with asyncio.timeout(timeout_s):
        while len(records) < count:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(batch)
    return records


class KafkaPortsContract:
    """Scenarios; a subclass provides the ``kafka`` and ``new_topic`` fixtures."""

    @pytest.fixture
    async def stack(self) -> AsyncIterator[AsyncExitStack]:
        async with AsyncExitStack() as stack:
            yield stack

    @pytest.fixture
    def group(self) -> str:
        return "g" + uuid.uuid4().hex[:12]

    async def producer(self, kafka: Kafka, stack: AsyncExitStack) -> Producer:
        producer = kafka.producer()
        await producer.start()
        stack.push_async_callback(producer.stop)
        return producer

    async def reader(
        self, kafka: Kafka, stack: AsyncExitStack, topic: str, partitions: int
    ) -> Consumer:
        consumer = kafka.consumer(None)
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        consumer.assign(all_of(topic, partitions))
        await consumer.seek_to_beginning(*all_of(topic, partitions))
        return consumer

    async def member(
        self, kafka: Kafka, stack: AsyncExitStack, group: str, topic: str, listener: Recorder
    ) -> Consumer:
        consumer = kafka.consumer(group)
        consumer.subscribe([topic], listener)
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        return consumer

    async def test_keyed_messages_arrive_in_key_order_with_their_headers(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack
    ) -> None:
        topic = await new_topic(3)
        producer = await self.producer(kafka, stack)
        headers = [("trace", b"t-1"), ("null", None)]
        acks = [
            await producer.send(topic, b"%d" % i, key=b"key-%d" % (i % 4), headers=headers)
            for i in range(20)
        ]
        await asyncio.gather(*acks)
        records = await read(await self.reader(kafka, stack, topic, 3), 20)
        per_key: dict[bytes | None, list[int]] = {}
        for record in records:
            assert record.key is not None
            assert record.partition == partition_of(record.key, 3)
            assert [tuple(h) for h in record.headers] == headers
            assert record.timestamp > 0
            per_key.setdefault(record.key, []).append(int(record.value or b""))
        assert per_key == {b"key-%d" % k: list(range(k, 20, 4)) for k in range(4)}

    async def test_a_new_member_resumes_after_the_groups_commit(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack, group: str
    ) -> None:
        topic = await new_topic(2)
        producer = await self.producer(kafka, stack)
        for i in range(6):
            await producer.send_and_wait(topic, b"old-%d" % i, key=b"k%d" % i)
        events: list[Event] = []
        first = await self.member(kafka, stack, group, topic, Recorder("first", events))
        records = await read(first, 6)
        assert events == [
            ("first", "revoked", frozenset()),
            ("first", "assigned", all_of(topic, 2)),
        ]
        ends = await first.end_offsets(list(all_of(topic, 2)))
        with pytest.raises(CommitFailed):  # not assigned to this member
            await first.commit({TopicPartition(topic + "-other", 0): 1})
        await first.commit(ends)
        assert {tp: await first.committed(tp) for tp in ends} == ends
        assert sorted(r.value or b"" for r in records) == [b"old-%d" % i for i in range(6)]
        await first.stop()
        assert len(events) == 2  # leaving the group calls no listener
        with pytest.raises(BrokerUnavailable):
            await first.getmany()
        for i in range(3):
            await producer.send_and_wait(topic, b"new-%d" % i, key=b"k%d" % i)
        second = await self.member(kafka, stack, group, topic, Recorder("second", events))
        fresh = await read(second, 3)
        assert sorted(r.value or b"" for r in fresh) == [b"new-0", b"new-1", b"new-2"]
        assert await second.getmany(timeout_ms=200) == {}

    async def test_a_second_member_takes_half_after_the_first_revokes_everything(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack, group: str
    ) -> None:
        topic = await new_topic(4)
        events: list[Event] = []
        first = await self.member(kafka, stack, group, topic, Recorder("first", events))
        async with asyncio.timeout(10):
            while len(events) < 2:
                await first.getmany(timeout_ms=100)
        second = await self.member(kafka, stack, group, topic, Recorder("second", events))

        async def poll(consumer: Consumer) -> None:
            while True:
                await consumer.getmany(timeout_ms=100)

        polls = [asyncio.create_task(poll(c)) for c in (first, second)]
        try:
            async with asyncio.timeout(15):
                while sum(kind == "assigned" for _, kind, _ in events) < 3:
                    await asyncio.sleep(0.02)
        finally:
            for task in polls:
                task.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
        mine = [(kind, tps) for name, kind, tps in events if name == "first"]
        theirs = [(kind, tps) for name, kind, tps in events if name == "second"]
        assert mine[:3] == [
            ("revoked", frozenset()),
            ("assigned", all_of(topic, 4)),
            ("revoked", all_of(topic, 4)),  # eager: everything, not just what moves
        ]
        assert mine[3][0] == "assigned" and theirs[0] == ("revoked", frozenset())
        assert theirs[1][0] == "assigned"
        assert len(mine[3][1]) == len(theirs[1][1]) == 2
        assert mine[3][1] | theirs[1][1] == all_of(topic, 4)
        assert events.index(("first", "revoked", all_of(topic, 4))) < events.index(
            ("second", "assigned", theirs[1][1])
        )
        assert first.assignment() == mine[3][1] and second.assignment() == theirs[1][1]

    async def test_a_group_less_reader_reads_everything_up_to_the_end_offsets(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack
    ) -> None:
        topic = await new_topic(2)
        producer = await self.producer(kafka, stack)
        for i in range(10):
            await producer.send_and_wait(topic, b"%d" % i, key=b"k%d" % i)
        reader = await self.reader(kafka, stack, topic, 2)
        assert await reader.partitions_for(topic) == {0, 1}
        ends = await reader.end_offsets(list(all_of(topic, 2)))
        assert sum(ends.values()) == 10
        records = await read(reader, 10)
        assert sorted(int(r.value or b"") for r in records) == list(range(10))
        assert {tp: await reader.position(tp) for tp in ends} == ends
        with pytest.raises(KafkaPortError) as refused:
            await reader.commit(ends)
        assert not isinstance(refused.value, BrokerUnavailable | CommitFailed)
        await reader.stop()
        with pytest.raises(BrokerUnavailable):
            await reader.getmany()

    async def test_a_topic_created_after_a_reader_started_is_found_and_a_missing_one_not(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack
    ) -> None:
        # A client's own reply topic, created by the operator while workers run: a worker's
        # metadata cache must not refuse it for minutes (``worker.replies``).
        first = await new_topic(1)
        reader = await self.reader(kafka, stack, first, 1)
        assert await reader.partitions_for(first) == {0}
        later = await new_topic(3)
        assert await reader.partitions_for(later) == {0, 1, 2}
        never = "t" + uuid.uuid4().hex[:12]
        assert await reader.partitions_for(never) == set()
        assert await reader.partitions_for(never) == set()  # still not created by looking

    async def test_pause_holds_a_partition_back_until_resume(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack
    ) -> None:
        topic = await new_topic(2)
        producer = await self.producer(kafka, stack)
        candidates = [b"k%d" % i for i in range(20)]
        keys = {p: next(k for k in candidates if partition_of(k, 2) == p) for p in (0, 1)}
        for i in range(3):
            for partition, key in keys.items():
                await producer.send_and_wait(topic, b"p%d-%d" % (partition, i), key=key)
        reader = await self.reader(kafka, stack, topic, 2)
        paused = TopicPartition(topic, 0)
        reader.pause(paused)
        first = await read(reader, 3)
        assert {r.partition for r in first} == {1}
        assert await reader.getmany(timeout_ms=300) == {}
        reader.resume(paused)
        rest = await read(reader, 3)
        assert [r.value for r in rest] == [b"p0-0", b"p0-1", b"p0-2"]

    async def test_a_message_over_the_limit_is_refused_by_send(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack
    ) -> None:
        topic = await new_topic(1)
        producer = await self.producer(kafka, stack)
        assert producer.max_message_bytes == MAX_MESSAGE_BYTES
        with pytest.raises(MessageTooLarge):
            await producer.send(topic, b"x" * (MAX_MESSAGE_BYTES + 1))
        await producer.send_and_wait(topic, b"small")
        reader = await self.reader(kafka, stack, topic, 1)
        assert await reader.end_offsets([TopicPartition(topic, 0)]) == {TopicPartition(topic, 0): 1}

    async def test_a_queued_message_is_delivered_when_a_new_topic_is_sent_to_meanwhile(
        self, kafka: Kafka, new_topic: NewTopic, stack: AsyncExitStack
    ) -> None:
        # A worker replies on the shared topic while a client names a reply topic of its own:
        # aiokafka alone then forgets the shared topic's leader and fails the queued reply at
        # request_timeout_ms (30 s), see ``infra.kafka.client.AiokafkaProducer``.
        known = await new_topic(2)
        producer = await self.producer(kafka, stack)
        await producer.send_and_wait(known, b"first")
        queued = await producer.send(known, b"queued")
        await producer.send_and_wait("t" + uuid.uuid4().hex[:12], b"to a topic never seen")
        async with asyncio.timeout(5):
            await queued
        records = await read(await self.reader(kafka, stack, known, 2), 2)
        assert sorted(r.value or b"" for r in records) == [b"first", b"queued"]


class TestMemoryKafka(KafkaPortsContract):
    @pytest.fixture
    def kafka(self) -> MemoryKafka:
        return MemoryKafka(max_message_bytes=MAX_MESSAGE_BYTES)

    @pytest.fixture
    def new_topic(self, kafka: MemoryKafka) -> NewTopic:
        async def create(partitions: int) -> str:
            name = "t" + uuid.uuid4().hex[:12]
            kafka.create_topic(name, partitions)
            return name

        return create


@pytest.mark.kafka
class TestClusterKafka(KafkaPortsContract):
    @pytest.fixture
    def kafka(self, broker: BrokerProcess) -> ClusterKafka:
        # Short group timeouts: a join takes ~1 s on Tansu (~2 s at 3000 ms, ~5 s at the
        # default), and a member that left generation 0 without a LeaveGroup (see FIELD-NOTES)
        # holds the next join back ~4 s (~7 s at 3000 ms). A short fetch wait too: Tansu
        # answers a waiting fetch only when it runs out.
        return ClusterKafka(
            KafkaSettings(
                bootstrap_servers=broker.bootstrap,
                session_timeout_ms=1500,
                heartbeat_interval_ms=500,
                max_request_size_bytes=MAX_MESSAGE_BYTES,
                fetch_max_wait_ms=50,
            )
        )

    @pytest.fixture
    def new_topic(self, broker: BrokerProcess) -> NewTopic:
        async def create(partitions: int) -> str:
            name = "t" + uuid.uuid4().hex[:12]
            await ensure_topics(broker.bootstrap, [TopicSpec(name, partitions)])
            return name

        return create
