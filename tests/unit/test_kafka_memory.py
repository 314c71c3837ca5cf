"""The in-memory Kafka cluster (``infra.kafka.memory``): partitioning, fetching, offsets, groups,
rebalances and the producer's failure hooks. No sockets, no processes."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.kafka.memory import MemoryConsumer, MemoryKafka, MemoryRecord, murmur2
from infra.kafka.ports import (
    BrokerUnavailable,
    CommitFailed,
    KafkaPortError,
    MessageTooLarge,
    Record,
    TopicPartition,
    UnknownTopic,
)

TOPIC = "requests"


def tps(topic: str, *partitions: int) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in partitions}


class Recorder:
    """A rebalance listener that records its calls, optionally committing on revocation."""

    def __init__(self, name: str, events: list[tuple[str, str, set[TopicPartition]]]) -> None:
        self.name = name
        self.events = events
        self.consumer: MemoryConsumer | None = None
        self.commit_on_revoke: dict[TopicPartition, int] = {}

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.events.append((self.name, "revoked", set(revoked)))
        if self.consumer is not None and self.commit_on_revoke:
            await self.consumer.commit(self.commit_on_revoke)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.events.append((self.name, "assigned", set(assigned)))


async def produce(kafka: MemoryKafka, topic: str, n: int, *, key: bytes | None = None) -> None:
    producer = kafka.producer()
    await producer.start()
    for i in range(n):
        await producer.send_and_wait(topic, f"v{i}".encode(), key=key)
    await producer.stop()


async def drain(consumer: MemoryConsumer, *, commit: bool = False) -> list[Record]:
    """Fetch until a fetch comes back empty (applies pending rebalances first)."""
    out: list[Record] = []
    while batches := await consumer.getmany(timeout_ms=0):
        for records in batches.values():
            out.extend(records)
        if commit:
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batches.items()})
    return out


async def group_member(
    kafka: MemoryKafka, group: str, recorder: Recorder | None = None
) -> MemoryConsumer:
    consumer = kafka.consumer(group)
    if recorder is not None:
        recorder.consumer = consumer
    consumer.subscribe([TOPIC], recorder)
    await consumer.start()
    return consumer


# -- partitioning and producing


@pytest.mark.parametrize(
    ("data", "expected"),
    [  # Kafka's own UtilsTest vectors (a signed 32-bit result, as in Java)
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_kafka(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@given(st.binary(max_size=64))
def test_murmur2_matches_aiokafka(data: bytes) -> None:
    assert murmur2(data) & 0xFFFFFFFF == aiokafka_murmur2(data)  # aiokafka's is unsigned


async def test_keyed_messages_go_to_kafkas_partition_and_keep_their_order() -> None:
    kafka = MemoryKafka(clock_ms=lambda: 1234)
    kafka.create_topic(TOPIC, 6)
    producer = kafka.producer()
    await producer.start()
    for key in (b"alpha", b"beta", b"gamma"):
        for i in range(5):
            await producer.send_and_wait(TOPIC, b"%d" % i, key=key, headers=[("h", None)])
    by_key: dict[bytes | None, list[MemoryRecord]] = defaultdict(list)
    for record in kafka.records(TOPIC):
        by_key[record.key].append(record)
    for found, records in by_key.items():
        assert found is not None
        assert {r.partition for r in records} == {(aiokafka_murmur2(found) & 0x7FFFFFFF) % 6}
        assert [r.value for r in records] == [b"0", b"1", b"2", b"3", b"4"]
        assert all(r.headers == (("h", None),) and r.timestamp == 1234 for r in records)
    offsets: dict[int, list[int]] = defaultdict(list)
    for record in kafka.records(TOPIC):
        offsets[record.partition].append(record.offset)
    assert all(o == list(range(len(o))) for o in offsets.values())


async def test_keyless_messages_round_robin_and_the_ack_carries_the_record() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 3)
    producer = kafka.producer()
    await producer.start()
    acks = [await producer.send(TOPIC, b"x") for _ in range(6)]
    records = [await ack for ack in acks]
    assert [r.partition for r in records if isinstance(r, MemoryRecord)] == [0, 1, 2, 0, 1, 2]


async def test_unknown_topics_are_auto_created_with_the_default_partitions() -> None:
    kafka = MemoryKafka(default_partitions=2)
    await produce(kafka, "fresh", 1)
    assert await kafka.consumer(None).partitions_for("fresh") == {0, 1}
    assert await kafka.consumer(None).partitions_for("absent") == set()


async def test_without_auto_create_the_ack_raises_unknown_topic() -> None:
    kafka = MemoryKafka(auto_create_topics=False)
    producer = kafka.producer()
    await producer.start()
    ack = await producer.send("missing", b"x")
    with pytest.raises(UnknownTopic):
        await ack
    with pytest.raises(UnknownTopic):
        kafka.records("missing")


async def test_a_message_over_the_limit_raises_from_send_and_is_not_appended() -> None:
    kafka = MemoryKafka(max_message_bytes=100)
    kafka.create_topic(TOPIC, 1)
    producer = kafka.producer()
    await producer.start()
    assert producer.max_message_bytes == 100
    with pytest.raises(MessageTooLarge):
        await producer.send(TOPIC, b"v" * 90, key=b"k" * 5, headers=[("h", b"x" * 5)])
    await producer.send_and_wait(TOPIC, b"v" * 90, key=b"k" * 5, headers=[("h", b"x" * 4)])
    assert len(kafka.records(TOPIC)) == 1


async def test_injected_failures_fail_the_next_acks_only() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 1)
    producer = kafka.producer()
    await producer.start()
    kafka.fail_sends(2, MessageTooLarge("broker limit"))
    for _ in range(2):
        with pytest.raises(MessageTooLarge, match="broker limit"):
            await producer.send_and_wait(TOPIC, b"x")
    await producer.send_and_wait(TOPIC, b"ok")
    kafka.fail_sends(1)
    with pytest.raises(BrokerUnavailable):
        await producer.send_and_wait(TOPIC, b"x")
    assert [r.value for r in kafka.records(TOPIC)] == [b"ok"]


async def test_ack_delay_holds_the_ack_and_stop_flushes_it() -> None:
    kafka = MemoryKafka(ack_delay_s=0.05)
    producer = kafka.producer()
    await producer.start()
    ack = await producer.send(TOPIC, b"x")
    assert not asyncio.ensure_future(ack).done()
    assert len(kafka.records(TOPIC)) == 1  # readable before its ack
    await producer.stop()
    assert asyncio.ensure_future(ack).done()
    with pytest.raises(BrokerUnavailable):
        await producer.send(TOPIC, b"late")


async def test_sending_before_start_is_refused() -> None:
    with pytest.raises(BrokerUnavailable):
        await MemoryKafka().producer().send(TOPIC, b"x")


# -- group-less consumers


async def started(kafka: MemoryKafka, *partitions: int) -> MemoryConsumer:
    consumer = kafka.consumer(None)
    await consumer.start()
    consumer.assign(tps(TOPIC, *partitions))
    return consumer


async def test_getmany_waits_for_a_produce_and_wakes_on_it() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 2)
    consumer = await started(kafka, 0, 1)
    t0 = time.monotonic()
    assert await consumer.getmany(timeout_ms=30) == {}
    assert time.monotonic() - t0 >= 0.025
    waiting = asyncio.create_task(consumer.getmany(timeout_ms=5_000))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    t0 = time.monotonic()
    await produce(kafka, TOPIC, 1)
    batches = await waiting
    assert time.monotonic() - t0 < 0.5
    assert [r.value for rs in batches.values() for r in rs] == [b"v0"]


async def test_max_records_bounds_a_fetch_across_partitions() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 4)
    await produce(kafka, TOPIC, 40)
    consumer = await started(kafka, 0, 1, 2, 3)
    seen: list[tuple[int, int]] = []
    while batches := await consumer.getmany(max_records=7):
        assert sum(len(rs) for rs in batches.values()) <= 7
        seen += [(r.partition, r.offset) for rs in batches.values() for r in rs]
    assert sorted(seen) == sorted((p, o) for p in range(4) for o in range(10))
    assert len(seen) == len(set(seen))


async def test_pause_stops_a_partition_and_resume_wakes_a_waiting_fetch() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 2)
    producer = kafka.producer()
    await producer.start()
    await producer.send_and_wait(TOPIC, b"p0")  # round robin: partition 0
    await producer.send_and_wait(TOPIC, b"p1")
    consumer = await started(kafka, 0, 1)
    consumer.pause(TopicPartition(TOPIC, 0))
    assert {tp.partition for tp in await consumer.getmany()} == {1}
    waiting = asyncio.create_task(consumer.getmany(timeout_ms=5_000))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    consumer.resume(TopicPartition(TOPIC, 0))
    assert [r.value for rs in (await waiting).values() for r in rs] == [b"p0"]
    with pytest.raises(KafkaPortError):
        consumer.pause(TopicPartition(TOPIC, 7))


async def test_seek_position_end_offsets() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 1)
    await produce(kafka, TOPIC, 5)
    tp = TopicPartition(TOPIC, 0)
    consumer = await started(kafka, 0)
    assert await consumer.position(tp) == 0
    assert await consumer.end_offsets([tp]) == {tp: 5}
    assert await consumer.lag([tp, TopicPartition(TOPIC, 3)]) == {tp: 5}
    consumer.seek(tp, 3)
    assert [r.offset for r in (await consumer.getmany())[tp]] == [3, 4]
    assert await consumer.position(tp) == 5
    await consumer.seek_to_beginning(tp)
    assert len((await consumer.getmany(max_records=2))[tp]) == 2
    await consumer.seek_to_end(tp)
    assert await consumer.getmany() == {}
    consumer.seek(tp, 99)  # out of range: reset to earliest, as aiokafka does
    assert (await consumer.getmany())[tp][0].offset == 0
    with pytest.raises(KafkaPortError):
        await consumer.position(TopicPartition(TOPIC, 1))
    with pytest.raises(UnknownTopic):
        await MemoryKafka(auto_create_topics=False).consumer(None).end_offsets([tp])


async def test_group_less_consumers_cannot_commit_or_subscribe() -> None:
    consumer = await started(MemoryKafka(), 0)
    tp = TopicPartition(TOPIC, 0)
    with pytest.raises(KafkaPortError, match="group_id"):
        await consumer.commit({tp: 1})
    with pytest.raises(KafkaPortError, match="group_id"):
        await consumer.committed(tp)
    with pytest.raises(KafkaPortError, match="group_id"):
        consumer.subscribe([TOPIC])


async def test_stopped_and_crashed_consumers_raise_and_never_hang() -> None:
    kafka = MemoryKafka()
    consumer = await started(kafka, 0)
    waiting = asyncio.create_task(consumer.getmany(timeout_ms=60_000))
    await asyncio.sleep(0.01)
    await consumer.stop()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(waiting, 1)
    member = await group_member(kafka, "g")
    waiting = asyncio.create_task(member.getmany(timeout_ms=60_000))
    await asyncio.sleep(0.01)
    member.crash()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(CommitFailed):
        await member.commit({TopicPartition(TOPIC, 0): 1})
    with pytest.raises(BrokerUnavailable):
        await kafka.consumer(None).getmany()  # never started


# -- groups


async def test_commit_then_a_restarted_member_resumes_after_it() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 2)
    await produce(kafka, TOPIC, 6)
    first = await group_member(kafka, "g")
    records = await drain(first)
    assert len(records) == 6
    done = {TopicPartition(TOPIC, p): 2 for p in (0, 1)}  # 2 of 3 per partition answered
    await first.commit(done)
    assert await first.committed(TopicPartition(TOPIC, 0)) == 2
    assert kafka.committed_offsets("g") == done
    await first.stop()
    second = await group_member(kafka, "g")
    assert sorted((r.partition, r.offset) for r in await drain(second)) == [(0, 2), (1, 2)]


async def test_two_members_split_the_partitions_revoked_before_assigned() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 4)
    events: list[tuple[str, str, set[TopicPartition]]] = []
    a = await group_member(kafka, "g", Recorder("a", events))
    await a.getmany()
    assert events == [("a", "revoked", set()), ("a", "assigned", tps(TOPIC, 0, 1, 2, 3))]
    b = await group_member(kafka, "g", Recorder("b", events))
    waiting_b = asyncio.create_task(b.getmany(timeout_ms=5_000))
    await asyncio.sleep(0.01)
    assert events[2:] == [("b", "revoked", set())]  # b waits: a still holds its partitions
    assert not waiting_b.done()
    await a.getmany()
    await asyncio.sleep(0.01)  # b wakes on a's release; it then waits for records
    waiting_b.cancel()
    assert events[3:] == [
        ("a", "revoked", tps(TOPIC, 0, 1, 2, 3)),
        ("a", "assigned", tps(TOPIC, 0, 2)),
        ("b", "assigned", tps(TOPIC, 1, 3)),
    ]
    assert a.assignment() == tps(TOPIC, 0, 2)
    assert b.assignment() == tps(TOPIC, 1, 3)


async def test_a_leaving_member_hands_over_at_the_committed_offset() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 2)
    await produce(kafka, TOPIC, 8)
    events: list[tuple[str, str, set[TopicPartition]]] = []
    a = await group_member(kafka, "g", Recorder("a", events))
    b = await group_member(kafka, "g", Recorder("b", events))
    await asyncio.gather(drain(a), drain(b))
    assert a.assignment() == tps(TOPIC, 0) and b.assignment() == tps(TOPIC, 1)
    await b.commit({TopicPartition(TOPIC, 1): 3})
    await b.stop()
    assert events[-1] == ("b", "assigned", tps(TOPIC, 1))  # stop calls no listener (aiokafka)
    records = await drain(a)
    assert a.assignment() == tps(TOPIC, 0, 1)
    # a re-reads partition 0 from its (absent) commit and partition 1 from b's commit.
    assert sorted((r.partition, r.offset) for r in records) == [
        *((0, o) for o in range(4)),
        (1, 3),
    ]


async def test_a_crashed_member_leaves_its_uncommitted_records_to_the_survivor() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 2)
    await produce(kafka, TOPIC, 4)
    a = await group_member(kafka, "g")
    b = await group_member(kafka, "g")
    await drain(a, commit=True)
    assert len(await drain(b)) == 2  # read, never committed
    b.crash()
    redelivered = await drain(a)
    assert sorted((r.partition, r.offset) for r in redelivered) == [(1, 0), (1, 1)]


async def test_commit_fails_for_partitions_not_owned_but_not_inside_revoke() -> None:
    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 2)
    events: list[tuple[str, str, set[TopicPartition]]] = []
    recorder = Recorder("a", events)
    a = await group_member(kafka, "g", recorder)
    with pytest.raises(CommitFailed):  # joined, but the assignment is not applied yet
        await a.commit({TopicPartition(TOPIC, 0): 0})
    await a.getmany()
    with pytest.raises(CommitFailed):
        await a.commit({TopicPartition("other", 0): 1})
    recorder.commit_on_revoke = {TopicPartition(TOPIC, 1): 5}
    await group_member(kafka, "g")
    await a.getmany()  # revokes both inside the listener (its commit succeeds), keeps 0
    assert kafka.committed_offsets("g") == {TopicPartition(TOPIC, 1): 5}
    with pytest.raises(CommitFailed):
        await a.commit({TopicPartition(TOPIC, 1): 6})
    await a.commit({TopicPartition(TOPIC, 0): 1})


async def test_subscribing_creates_the_topic_or_waits_for_it() -> None:
    kafka = MemoryKafka(default_partitions=3)
    a = await group_member(kafka, "g")
    await a.getmany()
    assert a.assignment() == tps(TOPIC, 0, 1, 2)
    strict = MemoryKafka(auto_create_topics=False)
    b = await group_member(strict, "g")
    await b.getmany()
    assert b.assignment() == set()
    strict.create_topic(TOPIC, 2)
    await b.getmany()
    assert b.assignment() == tps(TOPIC, 0, 1)


async def test_a_failing_listener_is_logged_and_the_rebalance_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            raise RuntimeError("bug")

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            raise RuntimeError("bug")

    kafka = MemoryKafka()
    kafka.create_topic(TOPIC, 1)
    consumer = kafka.consumer("g")
    consumer.subscribe([TOPIC], Broken())
    await consumer.start()
    await consumer.getmany()
    assert consumer.assignment() == tps(TOPIC, 0)
    assert "rebalance listener failed" in caplog.text


# -- properties

keys = st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), max_size=60)


@settings(max_examples=60, deadline=None)
@given(
    keys=keys,
    partitions=st.integers(1, 5),
    max_records=st.integers(1, 9),
    restarts=st.sets(st.integers(0, 20), max_size=4),
)
def test_each_record_is_delivered_once_in_key_order_across_restarts(
    keys: list[bytes], partitions: int, max_records: int, restarts: set[int]
) -> None:
    """A member that commits after each batch, restarted at arbitrary batches (a new member
    of the same group each time), sees every record exactly once and each key in order."""

    async def scenario() -> None:
        kafka = MemoryKafka()
        kafka.create_topic(TOPIC, partitions)
        producer = kafka.producer()
        await producer.start()
        acks = [await producer.send(TOPIC, b"%d" % i, key=key) for i, key in enumerate(keys)]
        await asyncio.gather(*acks)
        consumer = await group_member(kafka, "g")
        seen: list[Record] = []
        batch_no = 0
        while batches := await consumer.getmany(max_records=max_records):
            seen += [r for rs in batches.values() for r in rs]
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batches.items()})
            if batch_no in restarts:
                await consumer.stop()
                consumer = await group_member(kafka, "g")
            batch_no += 1
        assert sorted(int(r.value or b"") for r in seen) == list(range(len(keys)))
        per_key: dict[bytes | None, list[int]] = defaultdict(list)
        for record in seen:
            per_key[record.key].append(int(record.value or b""))
        assert all(values == sorted(values) for values in per_key.values())

    asyncio.run(scenario())
