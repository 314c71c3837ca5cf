"""The Kafka ports: what the worker, settlement, the client and the topic readers use of Kafka.

Services are written against these Protocols, never against a client library, so the same code
runs on a real cluster (``infra.kafka.client``: aiokafka) and in memory
(``infra.kafka.memory``: the contract tier runs intake and settlement scenarios on both).

Exceptions, translated where they leave a client library (``infra.kafka.client``)::

    KafkaPortError              anything Kafka refused or could not do
    ├── CommitFailed            the group moved on (rebalance): the offsets were not committed
    ├── MessageTooLarge         one message is over the producer's (or broker's) size limit
    ├── UnknownTopic            the topic does not exist (a broker without auto-create)
    └── BrokerUnavailable       the cluster did not answer within the client's retry budget

The first three concern one message or one commit: the caller answers or dead-letters that
message and goes on. ``BrokerUnavailable`` is the only one that may stop a service.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = [
    "BrokerUnavailable",
    "CommitFailed",
    "Consumer",
    "Headers",
    "Kafka",
    "KafkaPortError",
    "MessageTooLarge",
    "Producer",
    "RebalanceListener",
    "Record",
    "TopicPartition",
    "UnknownTopic",
    "UnreadableRecord",
]

Headers = Sequence[tuple[str, bytes | None]]
"""Kafka record headers. Header values may be null on the wire."""


class KafkaPortError(Exception):
    """Kafka refused or could not do something (see the module docstring for the tree)."""


class CommitFailed(KafkaPortError):
    """The commit was refused because the group rebalanced; the next owner redelivers."""


class MessageTooLarge(KafkaPortError):
    """One message exceeds the producer's ``max_request_size`` or the broker's limit."""


class UnknownTopic(KafkaPortError):
    """The topic does not exist and the broker does not create it."""


class BrokerUnavailable(KafkaPortError):
    """The cluster did not answer within the client's own retry budget."""


class TopicPartition(NamedTuple):
    """A topic and a partition (equal to, and hashing as, aiokafka's namesake)."""

    topic: str
    partition: int


class Record(Protocol):
    """One consumed record. ``timestamp`` is milliseconds since the epoch (<= 0: unknown)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def timestamp(self) -> int: ...


@dataclass(frozen=True, slots=True)
class UnreadableRecord:
    """A record the client library could not read (a header key that is not UTF-8, a corrupt
    batch). Consumers deliver it in its place, at its offset, instead of raising: one bad
    record must never stop a reader or hide the records around it. Its content is unknown:
    ``value`` is None and ``headers`` empty; ``reason`` says what was wrong."""

    topic: str
    partition: int
    offset: int
    reason: str
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp: int = -1


class RebalanceListener(Protocol):
    """Called by a group consumer around a change of its assignment. ``revoked`` runs before
    the partitions move (commit what is done there); both are awaited before fetching goes on."""

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None: ...

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None: ...


class Consumer(Protocol):
    """A consumer: in a group (``subscribe``) or reading assigned partitions (``assign``).

    Offsets are committed only by ``commit`` (never automatically)."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Leave the group (partitions move at once) and close."""
        ...

    def subscribe(
        self, topics: Sequence[str], listener: RebalanceListener | None = None
    ) -> None: ...

    def assign(self, partitions: Iterable[TopicPartition]) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    async def partitions_for(self, topic: str) -> set[int]:
        """The topic's partition ids (empty when the topic does not exist)."""
        ...

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        """Records from the assigned, unpaused partitions, waiting up to ``timeout_ms``. A
        record that cannot be read arrives as an ``UnreadableRecord`` at its offset."""
        ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit the next offset to read per partition; ``CommitFailed`` after a rebalance."""
        ...

    async def committed(self, partition: TopicPartition) -> int | None: ...

    async def position(self, partition: TopicPartition) -> int: ...

    async def end_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]: ...

    async def lag(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Records not yet fetched per partition (end - position), from what the consumer
        already knows: partitions it cannot tell yet are left out, never reported as 0."""
        ...

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None: ...

    async def seek_to_end(self, *partitions: TopicPartition) -> None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...


class Producer(Protocol):
    """A producer with ``acks=all``: a message counts as sent once its ack has arrived."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Flush what is queued, then close."""
        ...

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> Awaitable[object]:
        """Queue one message; the returned awaitable completes when the cluster acknowledged it
        (or raises a ``KafkaPortError``). Queueing itself may wait when the buffer is full."""
        ...

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Send one message and wait for its acknowledgement."""
        ...

    @property
    def max_message_bytes(self) -> int:
        """The largest message (value, key and headers) this producer sends."""
        ...


class Kafka(Protocol):
    """Builds consumers and producers for one cluster (real or in memory)."""

    def consumer(self, group_id: str | None) -> Consumer:
        """A consumer in ``group_id``, or a group-less one (``assign``) when None."""
        ...

    def producer(self) -> Producer: ...
