"""A consumer whose ``getmany``, ``commit`` or ``lag`` hangs for ever or raises, on demand.

``StuckConsumer`` wraps any ``Consumer`` (the in-memory one, usually) and passes every call
through until ``stick(method, how)`` is called: from then on that method blocks until it is
cancelled (``how="block"``, as a request to a broker that never answers) or raises
(``how="raise"``: ``BrokerUnavailable``, or ``RuntimeError`` for ``how="bug"``, an error no
port promises). ``entered[method]`` is set each time a call reaches the stuck method, so a test
can act while the service is inside that await; ``calls[method]`` counts every call, the
ones before ``stick`` included.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from infra.kafka.ports import (
    BrokerUnavailable,
    Consumer,
    RebalanceListener,
    Record,
    TopicPartition,
)

__all__ = ["METHODS", "How", "Method", "StuckConsumer"]

Method = Literal["getmany", "commit", "lag"]
How = Literal["block", "raise", "bug"]
METHODS: tuple[Method, ...] = ("getmany", "commit", "lag")


class StuckConsumer(Consumer):
    def __init__(self, inner: Consumer) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.entered: dict[str, asyncio.Event] = {m: asyncio.Event() for m in METHODS}
        self.committed_offsets: list[dict[TopicPartition, int]] = []
        """Offsets of every commit that reached the inner consumer."""
        self._stuck: dict[str, How] = {}

    def stick(self, method: Method, how: How = "block") -> None:
        self._stuck[method] = how
        self.entered[method].clear()

    def unstick(self, method: Method) -> None:
        self._stuck.pop(method, None)

    async def _maybe_stuck(self, method: Method) -> None:
        self.calls[method] += 1
        how = self._stuck.get(method)
        if how is None:
            return
        self.entered[method].set()
        if how == "raise":
            raise BrokerUnavailable(f"injected: {method}")
        if how == "bug":
            raise RuntimeError(f"injected: {method}")
        await asyncio.Event().wait()  # until cancelled

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        await self._maybe_stuck("getmany")
        return await self.inner.getmany(timeout_ms=timeout_ms, max_records=max_records)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await self._maybe_stuck("commit")
        await self.inner.commit(offsets)
        self.committed_offsets.append(dict(offsets))

    async def lag(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        await self._maybe_stuck("lag")
        return await self.inner.lag(partitions)

    # -- passed through --------------------------------------------------------------------

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

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        await self.inner.seek_to_beginning(*partitions)

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        await self.inner.seek_to_end(*partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.inner.seek(partition, offset)
