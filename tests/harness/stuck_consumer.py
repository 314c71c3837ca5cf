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
from collections.abc import Mapping, Sequence
from typing import Literal

from infra.kafka.ports import (
    BrokerUnavailable,
    Consumer,
    Record,
    TopicPartition,
)
from tests.harness.forwarding import ForwardingConsumer

__all__ = ["METHODS", "How", "Method", "StuckConsumer"]

Method = Literal["getmany", "commit", "lag"]
How = Literal["block", "raise", "bug"]
METHODS: tuple[Method, ...] = ("getmany", "commit", "lag")


class StuckConsumer(ForwardingConsumer):
    def __init__(self, inner: Consumer) -> None:
        super().__init__(inner)
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
