"""The Kafka ports in memory: a cluster, its producers and consumers on the running event loop.

Why this module exists: services are written against ``infra.kafka.ports``; this is the stub
that ships beside the real adapter (``infra.kafka.client``), as dramatiq ships ``StubBroker``
and httpx ``MockTransport``. The contract tier runs the same scenarios on it (milliseconds) and
on a real broker, so it behaves as aiokafka does wherever a service can tell:

- Keyed messages go to ``murmur2(key) & 0x7fffffff`` modulo the partition count (Kafka's and
  aiokafka's ``DefaultPartitioner``), so a key lands on the same partition number as on a real
  cluster; keyless messages round-robin per topic.
- A message larger than ``max_message_bytes`` (value, key and header bytes; aiokafka adds some
  70 bytes of record overhead to its count) raises ``MessageTooLarge`` from ``send`` itself,
  as aiokafka does, and is not appended. Every other failure arrives through the ack.
- Groups rebalance eagerly and offsets start at the committed offset, else at the beginning
  (``auto_offset_reset=earliest``): see ``infra.kafka.memory_group``.
- No threads and no sleeps: ``getmany`` waits on an event set by every produce, rebalance,
  resume and seek, up to its ``timeout_ms``.

Not modelled: replication, retention and compaction (a compacted topic keeps every record, as
before the log cleaner runs), transactions, fetch size limits.

Test hooks: ``fail_sends``, ``ack_delay_s``, ``records``, ``committed_offsets`` on
``MemoryKafka``; ``MemoryConsumer.crash``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from infra.kafka.memory_group import MemoryConsumer, _Group
from infra.kafka.ports import (
    BrokerUnavailable,
    Headers,
    Kafka,
    KafkaPortError,
    MessageTooLarge,
    Producer,
    TopicPartition,
    UnknownTopic,
    UnreadableRecord,
)

__all__ = ["MemoryConsumer", "MemoryKafka", "MemoryProducer", "MemoryRecord", "murmur2"]

DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
"""aiokafka's ``max_request_size`` default."""


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """One record of a topic (implements ``infra.kafka.ports.Record``)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp: int
    """Milliseconds since the epoch, from the cluster's ``clock_ms``."""


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as a signed 32-bit int.

    The partition of a keyed message is ``(murmur2(key) & 0x7fffffff) % partitions``.
    """
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    tail = length - length % 4
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length % 4
    if rest:
        for i in range(rest - 1, -1, -1):
            h ^= data[tail + i] << (8 * i)
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Topic:
    partitions: list[list[MemoryRecord | UnreadableRecord]]
    compacted: bool
    next_keyless: int = 0


@dataclass
class _Failures:
    remaining: int = 0
    error: KafkaPortError = field(default_factory=lambda: BrokerUnavailable("injected"))


class MemoryKafka(Kafka):
    """An in-memory cluster (implements ``infra.kafka.ports.Kafka``).

    ``auto_create_topics``: producing to, or subscribing to, an unknown topic creates it with
    ``default_partitions`` (Tansu's behaviour); when off, a send to it fails its ack with
    ``UnknownTopic``. ``clock_ms`` stamps records. ``ack_delay_s`` holds every ack back (the
    record is readable at once). Use it on one event loop.
    """

    def __init__(
        self,
        *,
        auto_create_topics: bool = True,
        default_partitions: int = 4,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ack_delay_s: float = 0.0,
    ) -> None:
        self.auto_create_topics = auto_create_topics
        self.default_partitions = default_partitions
        self.clock_ms = clock_ms
        self.max_message_bytes = max_message_bytes
        self.ack_delay_s = ack_delay_s
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        self._failures = _Failures()
        self._changed = asyncio.Event()

    # -- Kafka port ------------------------------------------------------------------------------

    def consumer(self, group_id: str | None) -> MemoryConsumer:
        return MemoryConsumer(self, group_id)

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self)

    # -- administration and test hooks -----------------------------------------------------------

    def create_topic(self, name: str, partitions: int, *, compacted: bool = False) -> None:
        """Create a topic; creating an existing one with the same partition count is a no-op."""
        if partitions < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1")
        existing = self._topics.get(name)
        if existing is not None:
            if len(existing.partitions) != partitions:
                raise ValueError(
                    f"topic {name!r} exists with {len(existing.partitions)} partitions"
                )
            return
        self._topics[name] = _Topic([[] for _ in range(partitions)], compacted)
        for group in self._groups.values():
            group.topic_created(name)

    def records(self, topic: str) -> list[MemoryRecord | UnreadableRecord]:
        """Every record of ``topic`` in (partition, offset) order."""
        state = self._topics.get(topic)
        if state is None:
            raise UnknownTopic(topic)
        return [record for log in state.partitions for record in log]

    def committed_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """The offsets ``group_id`` has committed (empty for an unknown group)."""
        group = self._groups.get(group_id)
        return dict(group.committed) if group is not None else {}

    def append_unreadable(self, topic: str, partition: int = 0, reason: str = "unreadable") -> int:
        """Append a record consumers cannot read (as a header key that is not UTF-8 is to
        aiokafka): they deliver it as an ``UnreadableRecord`` at its offset. Returns it."""
        state = self._topic(topic, create=True)
        if state is None:
            raise UnknownTopic(topic)
        log = state.partitions[partition]
        log.append(UnreadableRecord(topic, partition, len(log), reason))
        self._notify()
        return len(log) - 1

    def fail_sends(self, count: int, error: KafkaPortError | None = None) -> None:
        """Fail the acks of the next ``count`` sends with (a copy of) ``error``, default
        ``BrokerUnavailable``; a failed message is not appended (the cluster refused it)."""
        self._failures = _Failures(count, error or BrokerUnavailable("injected"))

    # -- shared with producers and consumers -----------------------------------------------------

    def _topic(self, name: str, *, create: bool) -> _Topic | None:
        if name not in self._topics and create and self.auto_create_topics:
            self.create_topic(name, self.default_partitions)
        return self._topics.get(name)

    def _partition_count(self, name: str) -> int:
        state = self._topics.get(name)
        return 0 if state is None else len(state.partitions)

    def _log(self, tp: TopicPartition) -> list[MemoryRecord | UnreadableRecord]:
        state = self._topics.get(tp.topic)
        if state is None or not 0 <= tp.partition < len(state.partitions):
            return []
        return state.partitions[tp.partition]

    def _group(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            group = self._groups[group_id] = _Group(self)
        return group

    def _changed_event(self) -> asyncio.Event:
        """The event the next change sets (take it before looking at the state)."""
        return self._changed

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _produce(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers | None
    ) -> asyncio.Future[MemoryRecord]:
        if value is None and key is None:
            raise ValueError("a message needs a key or a value")
        frozen_headers = tuple((str(k), v) for k, v in headers or ())
        size = len(value or b"") + len(key or b"")
        size += sum(len(k.encode()) + len(v or b"") for k, v in frozen_headers)
        if size > self.max_message_bytes:
            raise MessageTooLarge(f"{size} bytes > max_message_bytes {self.max_message_bytes}")
        ack: asyncio.Future[MemoryRecord] = asyncio.get_running_loop().create_future()
        if self._failures.remaining > 0:
            self._failures.remaining -= 1
            error = self._failures.error
            return self._settle(ack, type(error)(*error.args))
        state = self._topic(topic, create=True)
        if state is None:
            return self._settle(ack, UnknownTopic(topic))
        if key is not None:
            partition = (murmur2(key) & 0x7FFFFFFF) % len(state.partitions)
        else:
            partition = state.next_keyless % len(state.partitions)
            state.next_keyless += 1
        log = state.partitions[partition]
        record = MemoryRecord(
            topic, partition, len(log), key, value, frozen_headers, self.clock_ms()
        )
        log.append(record)
        self._notify()
        return self._settle(ack, record)

    def _settle(
        self, ack: asyncio.Future[MemoryRecord], outcome: MemoryRecord | KafkaPortError
    ) -> asyncio.Future[MemoryRecord]:
        def settle() -> None:
            if ack.done():  # cancelled by its waiter
                return
            if isinstance(outcome, KafkaPortError):
                ack.set_exception(outcome)
            else:
                ack.set_result(outcome)

        if self.ack_delay_s > 0:
            asyncio.get_running_loop().call_later(self.ack_delay_s, settle)
        else:
            settle()
        return ack


class MemoryProducer(Producer):
    """A producer of a ``MemoryKafka`` (implements ``infra.kafka.ports.Producer``).

    ``send`` appends at once and returns the ack, which resolves to the ``MemoryRecord``.
    Sending before ``start`` or after ``stop`` raises ``BrokerUnavailable``.
    """

    def __init__(self, kafka: MemoryKafka) -> None:
        self._kafka = kafka
        self._started = False
        self._closed = False
        self._pending: set[asyncio.Future[MemoryRecord]] = set()

    @property
    def max_message_bytes(self) -> int:
        return self._kafka.max_message_bytes

    async def start(self) -> None:
        if self._closed:
            raise BrokerUnavailable("a stopped producer cannot be restarted")
        self._started = True

    async def stop(self) -> None:
        """Wait for the outstanding acks (their failures are the senders' business), close."""
        self._closed = True
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> Awaitable[object]:
        if self._closed or not self._started:
            raise BrokerUnavailable("producer is stopped" if self._closed else "not started")
        ack = self._kafka._produce(topic, value, key, headers)
        if not ack.done():
            self._pending.add(ack)
            ack.add_done_callback(self._pending.discard)
        return ack

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> None:
        await (await self.send(topic, value, key=key, headers=headers))
