"""Kafka environments for the contract tier: one scenario, run on ``MemoryKafka`` or on Tansu.

A ``KafkaEnv`` holds what differs between the two: the ``Kafka`` port clients are built with,
how topics are created, how a consumer "crashes", and the time scales (how often an intake
commits, how long to watch for something that must not happen). Everything a scenario checks
afterwards (a topic read back, a group's committed offsets) goes through the ports themselves,
so that code is the same on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from infra.kafka.admin import ensure_topics
from infra.kafka.client import ClusterKafka
from infra.kafka.memory import MemoryConsumer, MemoryKafka
from infra.kafka.ports import Consumer, Kafka, Producer, Record, TopicPartition
from infra.kafka.settings import KafkaSettings
from schemas.topics import Topics, TopicSpec, standard_topics

__all__ = ["KafkaEnv", "MemoryEnv", "TansuEnv", "end_offsets", "wait_until"]


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout_s: float,
    interval_s: float,
    what: str = "condition",
) -> None:
    """Poll ``check`` every ``interval_s`` until it holds; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


@dataclass
class KafkaEnv:
    """One backend. Time scales: ``commit_interval_s`` for intakes, ``poll_s`` between checks,
    ``quiet_s`` to watch that nothing more happens, ``timeout_s`` for what must happen."""

    name: str
    kafka: Kafka
    commit_interval_s: float
    poll_s: float
    quiet_s: float
    timeout_s: float
    read_idle_ms: int

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        raise NotImplementedError

    async def crash(self, consumer: Consumer) -> None:
        """Make ``consumer`` vanish without committing (its partitions move on)."""
        raise NotImplementedError

    async def new_namespace(self, models: Sequence[str], *, partitions: int = 4) -> Topics:
        """A fresh namespace ("t" + uuid hex) with the standard topics."""
        topics = Topics("t" + uuid.uuid4().hex[:12])
        await self.create_topics(
            standard_topics(topics.namespace, models, request_partitions=partitions)
        )
        return topics

    async def wait_until(
        self, check: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str = "condition"
    ) -> None:
        await wait_until(check, timeout_s=self.timeout_s, interval_s=self.poll_s, what=what)

    @contextlib.asynccontextmanager
    async def producer(self) -> AsyncIterator[Producer]:
        producer = self.kafka.producer()
        await producer.start()
        try:
            yield producer
        finally:
            await producer.stop()

    async def read(self, topic: str, *, at_least: int = 0) -> list[Record]:
        """Every record of ``topic`` from the beginning: waits for ``at_least`` of them, then
        until nothing new arrives for ``read_idle_ms``."""
        consumer = self.kafka.consumer(None)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(await consumer.partitions_for(topic))]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            records: list[Record] = []
            async with asyncio.timeout(self.timeout_s):
                while True:
                    batches = await consumer.getmany(timeout_ms=self.read_idle_ms)
                    for batch in batches.values():
                        records.extend(batch)
                    if not batches and len(records) >= at_least:
                        return records
        finally:
            await consumer.stop()

    async def committed(self, group: str, topic: str) -> dict[int, int | None]:
        """partition → the offset ``group`` committed on ``topic`` (None: nothing yet)."""
        consumer = self.kafka.consumer(group)
        await consumer.start()
        try:
            partitions = sorted(await consumer.partitions_for(topic))
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
        finally:
            await consumer.stop()


def end_offsets(records: Sequence[Record], partitions: int) -> dict[int, int | None]:
    """partition → one past the last offset among ``records`` (None for an empty partition);
    Tansu's ListOffsets(latest) is not the high watermark, so ends come from the records."""
    ends: dict[int, int | None] = dict.fromkeys(range(partitions))
    for record in records:
        ends[record.partition] = max(ends[record.partition] or 0, record.offset + 1)
    return ends


class MemoryEnv(KafkaEnv):
    def __init__(self) -> None:
        super().__init__(
            name="memory",
            kafka=MemoryKafka(),
            commit_interval_s=0.005,
            poll_s=0.005,
            quiet_s=0.05,
            timeout_s=5.0,
            read_idle_ms=5,
        )

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        assert isinstance(self.kafka, MemoryKafka)
        for spec in specs:
            compacted = spec.config.get("cleanup.policy") == "compact"
            self.kafka.create_topic(spec.name, spec.partitions, compacted=compacted)

    async def crash(self, consumer: Consumer) -> None:
        assert isinstance(consumer, MemoryConsumer)
        consumer.crash()


class TansuEnv(KafkaEnv):
    def __init__(self, bootstrap: str) -> None:
        # Short group timeouts: a join takes ~1 s on Tansu; a short fetch wait, as Tansu
        # answers a waiting fetch only when it runs out (see FIELD-NOTES).
        self.settings = KafkaSettings(
            bootstrap_servers=bootstrap,
            session_timeout_ms=1500,
            heartbeat_interval_ms=500,
            fetch_max_wait_ms=50,
        )
        super().__init__(
            name="tansu",
            kafka=ClusterKafka(self.settings),
            commit_interval_s=0.05,
            poll_s=0.05,
            quiet_s=0.5,
            timeout_s=30.0,
            read_idle_ms=300,
        )

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        await ensure_topics(self.settings.bootstrap_servers, specs)

    async def crash(self, consumer: Consumer) -> None:
        # aiokafka's stop never commits here (manual commits only) and calls no listener.
        await consumer.stop()
