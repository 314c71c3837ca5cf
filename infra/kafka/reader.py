"""Follow a topic from its beginning, without a consumer group: every reader sees everything.

Used for the registry (clients and settlement keep a view of the nodes), and by operator tools.
A ``TopicReader`` hands each record's value to ``apply`` in order; ``apply`` must not raise
(a record it cannot use is its own business to count), but if it does, the reader logs the
exception *type* and goes on: one bad record never blinds a reader.

Supervision: if the reading task itself dies (the cluster goes away past the client's retry
budget), ``failure`` holds why and ``healthy`` turns false, so the owner fails readiness and
stops acting on a view that may be stale (settlement commits nothing it rejected on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from infra.kafka.ports import Consumer, TopicPartition

__all__ = ["TopicReader"]

log = logging.getLogger(__name__)

_POLL_MS = 200


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TopicReader:
    """Lifecycle: ``start`` (returns once caught up, or after a timeout) → ``stop``."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        apply: Callable[[bytes | None, int], object],
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        """``apply(value, received_unix_ms)`` gets each record's value and the time this
        reader read it (its own clock, never a time the record claims)."""
        self._consumer = consumer
        self._topic = topic
        self._apply = apply
        self._clock_ms = clock_ms
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._end: dict[TopicPartition, int] = {}
        self._changed = asyncio.Condition()
        self.version = 0
        """Bumped after every batch of records applied, so a waiter can tell progress."""
        self.failure: BaseException | None = None

    @property
    def healthy(self) -> bool:
        """True while the reading task runs (after ``start``)."""
        return self._task is not None and not self._task.done() and self.failure is None

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def start(self, catch_up_timeout_s: float = 10.0) -> None:
        """Assign every partition, read from the start, and return once everything published
        before the call is read, or after ``catch_up_timeout_s``."""
        await self._consumer.start()
        partitions = await self._consumer.partitions_for(self._topic) or {0}
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._end = await self._consumer.end_offsets(tps)
        self._task = asyncio.create_task(self._read(), name=f"reader:{self._topic}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(catch_up_timeout_s):
                await self._caught_up.wait()

    async def stop(self) -> None:
        """Stop reading; a reader that died already (``failure``, reported then) stops quietly."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await self._task
                except Exception:
                    if self.failure is None:
                        raise
        await self._consumer.stop()

    async def wait_for_change(self, version: int, timeout_s: float) -> bool:
        """Wait until ``version`` moves past ``version``; False on timeout or failure."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: self.version > version or not self.healthy)
        return self.version > version

    async def _read(self) -> None:
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=_POLL_MS)
                received = self._clock_ms()
                for records in batches.values():
                    for record in records:
                        try:
                            self._apply(record.value, received)
                        except Exception as e:  # a bug must not blind the reader
                            log.error(
                                "record not applied",
                                extra={"topic": self._topic, "error_type": type(e).__name__},
                            )
                if batches:
                    self.version += 1
                if not self._caught_up.is_set() and await self._reached_end():
                    self._caught_up.set()
                if batches:
                    async with self._changed:
                        self._changed.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.failure = e
            log.critical(
                "topic reader stopped", extra={"topic": self._topic, "error_type": type(e).__name__}
            )
            async with self._changed:
                self._changed.notify_all()
            raise

    async def _reached_end(self) -> bool:
        for tp, end in self._end.items():
            if await self._consumer.position(tp) < end:
                return False
        return True
