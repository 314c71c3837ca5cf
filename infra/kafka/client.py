"""The Kafka ports on a real cluster, through aiokafka.

Thin adapters: they pass calls through, convert ``TopicPartition`` to aiokafka's own (aiokafka
checks the type), and translate aiokafka's exceptions into the ports' (``infra.kafka.ports``)
where they leave this module, so no service imports aiokafka.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Generator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
)
from aiokafka import TopicPartition as _TP
from aiokafka.errors import (  # type: ignore[import-untyped]
    CommitFailedError,
    ConsumerStoppedError,
    CorruptRecordException,
    IllegalGenerationError,
    IllegalOperation,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RebalanceInProgressError,
    RecordTooLargeError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
)

from infra.kafka.ports import (
    BrokerUnavailable,
    CommitFailed,
    Consumer,
    Headers,
    KafkaPortError,
    MessageTooLarge,
    Producer,
    RebalanceListener,
    Record,
    TopicPartition,
    UnknownTopic,
    UnreadableRecord,
)
from infra.kafka.settings import KafkaSettings

__all__ = ["AiokafkaConsumer", "AiokafkaProducer", "ClusterKafka", "translate"]

_LAG_TIMEOUT_S = 1.0
_ISOLATE_WAIT_MS = 1000
_UNREADABLE = (UnicodeDecodeError, CorruptRecordException)
"""What aiokafka raises from ``getmany`` for a record it cannot parse (the C reader and the
pure-Python one differ): a header key that is not UTF-8, a corrupt batch."""


def _reason(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "record header key is not UTF-8"
    return "record is corrupt"


_REBALANCE = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError)


def translate(error: BaseException) -> KafkaPortError:
    """The port exception for an aiokafka exception (its message never carries payloads)."""
    if isinstance(error, (*_REBALANCE, UnknownMemberIdError)):
        return CommitFailed(type(error).__name__)
    if isinstance(error, MessageSizeTooLargeError | RecordTooLargeError):
        return MessageTooLarge(type(error).__name__)
    if isinstance(error, UnknownTopicOrPartitionError):
        return UnknownTopic(type(error).__name__)
    if isinstance(error, IllegalStateError | IllegalOperation):
        # Refused in the consumer's state (partition not assigned, no group_id): not an outage.
        return KafkaPortError(type(error).__name__)
    return BrokerUnavailable(type(error).__name__)  # ConsumerStoppedError included


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except (KafkaError, IllegalOperation, ConsumerStoppedError) as e:
        raise translate(e) from e


def _tp(tp: TopicPartition) -> Any:
    return _TP(tp.topic, tp.partition)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: RebalanceListener) -> None:
        self._listener = listener

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        await self._listener.on_partitions_revoked({TopicPartition(*tp) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        await self._listener.on_partitions_assigned({TopicPartition(*tp) for tp in assigned})


class AiokafkaConsumer(Consumer):
    def __init__(self, settings: KafkaSettings, group_id: str | None) -> None:
        self._consumer = AIOKafkaConsumer(**settings.consumer_kwargs(group_id))
        self._group_id = group_id

    async def start(self) -> None:
        async with _translated():
            await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener | None = None) -> None:
        wrapped = _Listener(listener) if listener is not None else None
        self._consumer.subscribe(topics=list(topics), listener=wrapped)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._consumer.assign([_tp(tp) for tp in partitions])

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(*tp) for tp in self._consumer.assignment()}

    async def partitions_for(self, topic: str) -> set[int]:
        known = self._consumer.partitions_for_topic(topic)
        if known:
            return set(known)
        # Fresh metadata of every topic, without naming this one (no auto-creation). The
        # consumer's own ``topics()`` fetches it but drops it: its cached cluster (refreshed
        # every metadata_max_age_ms) would not show a topic created minutes ago.
        async with _translated():
            cluster = await self._consumer._client.fetch_all_metadata()
        return set(cluster.partitions_for_topic(topic) or ())

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        # aiokafka's TopicPartition is a NamedTuple equal to (and hashing as) ours.
        before = self._positions()
        try:
            batches: Mapping[TopicPartition, Sequence[Record]] = await self._consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except _UNREADABLE:
            return await self._isolate_unreadable(before)
        except (KafkaError, IllegalOperation, ConsumerStoppedError) as e:
            raise translate(e) from e
        return batches

    def _positions(self) -> dict[TopicPartition, int]:
        """The fetch position of every assigned partition, read without I/O from aiokafka's
        subscription state (what ``position()`` returns once it is known)."""
        subscription = self._consumer._subscription.subscription
        assignment = None if subscription is None else subscription.assignment
        if assignment is None:
            return {}
        positions = {}
        for tp in assignment.tps:
            state = assignment.state_value(tp)
            if state is not None and state.has_valid_position:
                positions[TopicPartition(*tp)] = int(state.position)
        return positions

    async def _isolate_unreadable(
        self, before: dict[TopicPartition, int]
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        """aiokafka raised while parsing a fetched batch: records of other partitions drained
        in the same call are gone from its buffer (their positions moved), and the bad one
        would raise on every call. Rewind every partition to where this call started, then read
        one record at a time until the one that cannot be read: deliver the good ones before
        it and an ``UnreadableRecord`` in its place, and move past it. Rare, so slow is fine.

        A partition without a fetch position when the call started (assigned during it: the
        first fetch after a rebalance) started where a new assignment starts, at its committed
        offset or else at its first (``auto_offset_reset=earliest``); rewound there too, or the
        records drained from it would be skipped for good."""
        starts = dict(before)
        for tp in self.assignment() - before.keys():
            starts[tp] = await self._start_offset(tp)
        for tp, offset in starts.items():
            self._consumer.seek(_tp(tp), offset)
        paused = {TopicPartition(*tp) for tp in self._consumer.paused()}
        for tp, offset in sorted(starts.items()):
            highwater = self._consumer.highwater(_tp(tp))
            if tp in paused or highwater is None or offset >= highwater:
                continue  # nothing fetched there: the bad record is elsewhere
            good: list[Record] = []
            position = offset
            while True:
                try:
                    got = await self._consumer.getmany(
                        _tp(tp), timeout_ms=_ISOLATE_WAIT_MS, max_records=1
                    )
                except _UNREADABLE as e:
                    self._consumer.seek(_tp(tp), position + 1)
                    bad = UnreadableRecord(tp.topic, tp.partition, position, _reason(e))
                    return {tp: [*good, bad]}
                except KafkaError as e:
                    raise translate(e) from e
                records = list(got.get(_tp(tp), ()))
                if not records:
                    break  # nothing more here: the bad record is in another partition
                good.extend(records)
                position = records[-1].offset + 1
            if good:
                return {tp: good}
        return {}

    async def _start_offset(self, tp: TopicPartition) -> int:
        """Where consuming ``tp`` starts after its assignment (see ``_isolate_unreadable``)."""
        async with _translated():
            if self._group_id is not None:
                committed = await self._consumer.committed(_tp(tp))
                if committed is not None:
                    return int(committed)
            first = await self._consumer.beginning_offsets([_tp(tp)])
        return int(first[_tp(tp)])

    def pause(self, *partitions: TopicPartition) -> None:
        self._consumer.pause(*(_tp(tp) for tp in partitions))

    def resume(self, *partitions: TopicPartition) -> None:
        self._consumer.resume(*(_tp(tp) for tp in partitions))

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            await self._consumer.commit({_tp(tp): offset for tp, offset in offsets.items()})
        except IllegalStateError as e:  # a partition no longer assigned: the group moved on
            raise CommitFailed(type(e).__name__) from e
        except (KafkaError, IllegalOperation) as e:
            raise translate(e) from e

    async def committed(self, partition: TopicPartition) -> int | None:
        async with _translated():
            offset = await self._consumer.committed(_tp(partition))
        return None if offset is None else int(offset)

    async def position(self, partition: TopicPartition) -> int:
        async with _translated():
            return int(await self._consumer.position(_tp(partition)))

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        async with _translated():
            ends = await self._consumer.end_offsets([_tp(tp) for tp in partitions])
        return {TopicPartition(*tp): int(offset) for tp, offset in ends.items()}

    async def lag(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        lags: dict[TopicPartition, int] = {}
        for tp in partitions:
            try:
                highwater = self._consumer.highwater(_tp(tp))
                if highwater is None:
                    continue
                async with asyncio.timeout(_LAG_TIMEOUT_S):
                    position = await self._consumer.position(_tp(tp))
            except (AssertionError, IllegalStateError, KafkaError, TimeoutError):
                continue  # not assigned (any more), or not resolvable now
            lags[tp] = max(0, int(highwater) - int(position))
        return lags

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        async with _translated():
            await self._consumer.seek_to_beginning(*(_tp(tp) for tp in partitions))

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        async with _translated():
            await self._consumer.seek_to_end(*(_tp(tp) for tp in partitions))

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(_tp(partition), offset)


class _Ack:
    """Awaits aiokafka's delivery future and translates its exception (no task per message)."""

    __slots__ = ("_future",)

    def __init__(self, future: Awaitable[object]) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, object]:
        try:
            return (yield from self._future.__await__())
        except KafkaError as e:
            raise translate(e) from e


class AiokafkaProducer(Producer):
    """aiokafka's producer, with every topic it sends to tracked in its metadata.

    aiokafka tracks only the topics it had to look up: a topic it knew from its first
    all-topics metadata is dropped from the cluster view at the next partial update (the
    first send to a new topic, such as a client's own reply topic), and messages queued for
    it meanwhile wait for an "unknown leader" until they fail at ``request_timeout_ms``.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self._producer = AIOKafkaProducer(**settings.producer_kwargs())
        self._max_message_bytes = settings.max_request_size_bytes
        self._tracked: set[str] = set()

    @property
    def max_message_bytes(self) -> int:
        return self._max_message_bytes

    async def start(self) -> None:
        async with _translated():
            await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> Awaitable[object]:
        if topic not in self._tracked:  # see the class docstring
            self._tracked.add(topic)
            self._producer.client.add_topic(topic)
        async with _translated():
            future = await self._producer.send(
                topic, value, key=key, headers=list(headers) if headers else None
            )
        return _Ack(future)

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> None:
        await (await self.send(topic, value, key=key, headers=headers))


class ClusterKafka:
    """``infra.kafka.ports.Kafka`` for a real cluster described by ``KafkaSettings``."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings

    def consumer(self, group_id: str | None) -> AiokafkaConsumer:
        return AiokafkaConsumer(self.settings, group_id)

    def producer(self) -> AiokafkaProducer:
        return AiokafkaProducer(self.settings)
