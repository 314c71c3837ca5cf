"""A ``Consumer`` that passes every call to another one: the base of the test wrappers
(``kafka_audit.AuditedConsumer``, ``stuck_consumer.StuckConsumer``), which override only the
calls they watch or break."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from infra.kafka.ports import Consumer, RebalanceListener, Record, TopicPartition

__all__ = ["ForwardingConsumer"]


class ForwardingConsumer(Consumer):
    def __init__(self, inner: Consumer) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener | None = None) -> None:
        self.inner.subscribe(topics, listener)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self.inner.assign(partitions)

    def assignment(self) -> set[TopicPartition]:
        return self.inner.assignment()

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        return await self.inner.getmany(timeout_ms=timeout_ms, max_records=max_records)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await self.inner.commit(offsets)

    async def partitions_for(self, topic: str) -> set[int]:
        return await self.inner.partitions_for(topic)

    def pause(self, *partitions: TopicPartition) -> None:
        self.inner.pause(*partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.inner.resume(*partitions)

    async def committed(self, partition: TopicPartition) -> int | None:
        return await self.inner.committed(partition)

    async def position(self, partition: TopicPartition) -> int:
        return await self.inner.position(partition)

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return await self.inner.end_offsets(partitions)

    async def lag(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return await self.inner.lag(partitions)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        await self.inner.seek_to_beginning(*partitions)

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        await self.inner.seek_to_end(*partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.inner.seek(partition, offset)
