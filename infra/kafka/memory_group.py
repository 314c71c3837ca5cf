"""Consumers of the in-memory cluster (``infra.kafka.memory``) and their group coordinator.

Group semantics, as aiokafka shows them on a real broker (the contract tier checks them there):

- Eager rebalance: a member starting (``start`` after ``subscribe``), leaving (``stop``,
  ``crash``), changing its subscription, or a subscribed topic appearing bumps the group's
  generation, and the coordinator computes a new round-robin assignment (aiokafka's default
  assignor: partitions sorted by topic and number, dealt to members in join order, each
  partition to the next member subscribed to its topic).
- A member applies a new generation on its next ``getmany``: it awaits
  ``on_partitions_revoked`` with *every* partition it owns (possibly none; commits of those
  partitions still succeed there), releases them, then takes its whole new assignment once
  no other member holds any of it, and awaits ``on_partitions_assigned`` (possibly empty).
  So no partition ever has two owners, and ``assigned`` is called once per generation.
- A newly owned partition starts at the group's committed offset, else at the beginning.
- ``commit`` raises ``CommitFailed`` unless the member owns every partition it names.
- ``stop`` leaves the group without calling the listener (as aiokafka's ``stop``); ``crash``
  does the same synchronously, as a killed process whose session expired at once. Neither
  commits anything. A listener that raises is logged and the rebalance goes on (as aiokafka).

Group-less consumers (``assign``) read any partitions and cannot commit. Calls a real client
refuses in the consumer's state (a partition not assigned, ``commit`` without a group,
``subscribe`` without a group, ``assign`` after ``subscribe``) raise a plain ``KafkaPortError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from infra.kafka.ports import (
    BrokerUnavailable,
    CommitFailed,
    Consumer,
    KafkaPortError,
    RebalanceListener,
    Record,
    TopicPartition,
    UnknownTopic,
    UnreadableRecord,
)

if TYPE_CHECKING:
    from infra.kafka.memory import MemoryKafka, MemoryRecord

__all__ = ["MemoryConsumer"]

log = logging.getLogger(__name__)

MAX_POLL_RECORDS = 500
"""Records per ``getmany`` when ``max_records`` is None (aiokafka's ``max_poll_records``)."""


class _Group:
    """The coordinator of one group id: members, generation, assignment, owners, offsets."""

    def __init__(self, kafka: MemoryKafka) -> None:
        self._kafka = kafka
        self.generation = 0
        self.committed: dict[TopicPartition, int] = {}
        self._members: dict[str, frozenset[str]] = {}
        self._target: dict[str, frozenset[TopicPartition]] = {}
        self._owner: dict[TopicPartition, str] = {}
        self._joins = 0

    def join(self, topics: Iterable[str]) -> str:
        # Zero-padded, so sorting member ids keeps join order (the assignment is deterministic).
        member_id = f"member-{self._joins:06d}"
        self._joins += 1
        self._members[member_id] = frozenset(topics)
        self._rebalance()
        return member_id

    def update(self, member_id: str, topics: Iterable[str]) -> None:
        self._members[member_id] = frozenset(topics)
        self._rebalance()

    def leave(self, member_id: str) -> None:
        self.release(member_id, self.owned(member_id))
        del self._members[member_id]
        self._rebalance()

    def topic_created(self, topic: str) -> None:
        if any(topic in topics for topics in self._members.values()):
            self._rebalance()

    def owned(self, member_id: str) -> set[TopicPartition]:
        return {tp for tp, owner in self._owner.items() if owner == member_id}

    def release(self, member_id: str, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if self._owner.get(tp) == member_id:
                del self._owner[tp]
        self._kafka._notify()

    def try_take(self, member_id: str) -> frozenset[TopicPartition] | None:
        """The member's whole assignment, once no other member holds any of it; else None."""
        target = self._target.get(member_id, frozenset())
        if any(self._owner.get(tp, member_id) != member_id for tp in target):
            return None
        for tp in target:
            self._owner[tp] = member_id
        return target

    def commit(self, member_id: str | None, offsets: Mapping[TopicPartition, int]) -> None:
        lost = [tp for tp in offsets if member_id is None or self._owner.get(tp) != member_id]
        if lost:
            raise CommitFailed(f"partitions not owned by this member: {sorted(lost)}")
        self.committed.update(offsets)

    def _rebalance(self) -> None:
        self.generation += 1
        members = sorted(self._members)
        topics = sorted({t for subscribed in self._members.values() for t in subscribed})
        dealt = {m: set[TopicPartition]() for m in members}
        turn = 0
        for topic in topics:
            for partition in range(self._kafka._partition_count(topic)):
                for _ in members:
                    member = members[turn % len(members)]
                    turn += 1
                    if topic in self._members[member]:
                        dealt[member].add(TopicPartition(topic, partition))
                        break
        self._target = {m: frozenset(tps) for m, tps in dealt.items()}
        self._kafka._notify()


class MemoryConsumer(Consumer):
    """A consumer of a ``MemoryKafka`` (implements ``infra.kafka.ports.Consumer``)."""

    def __init__(self, kafka: MemoryKafka, group_id: str | None) -> None:
        self._kafka = kafka
        self._group_id = group_id
        self._group = kafka._group(group_id) if group_id is not None else None
        self._topics: tuple[str, ...] | None = None
        self._listener: RebalanceListener | None = None
        self._member_id: str | None = None
        self._generation = 0
        self._synced = False
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._started = False
        self._closed = False
        self._round = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise KafkaPortError("a stopped consumer cannot be restarted")
        self._started = True
        self._join()

    async def stop(self) -> None:
        """Leave the group (the partitions move at once; no listener call) and close."""
        self.crash()

    def crash(self) -> None:
        """Vanish as a killed process would: no listener call, no commit; the group rebalances
        as after the session timeout. Later calls to ``getmany`` raise ``BrokerUnavailable``."""
        self._closed = True
        if self._group is not None and self._member_id is not None:
            self._group.leave(self._member_id)
        self._member_id = None
        self._positions.clear()
        self._paused.clear()
        self._kafka._notify()

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener | None = None) -> None:
        if self._group is None:
            raise KafkaPortError("subscribe needs a group_id (use assign without a group)")
        if self._topics is None and self._positions:
            raise KafkaPortError("subscribe after assign")
        self._topics = tuple(topics)
        self._listener = listener
        if self._member_id is not None:
            self._group.update(self._member_id, self._subscribed_topics())
        self._join()

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        if self._topics is not None:
            raise KafkaPortError("assign after subscribe")
        committed = self._group.committed if self._group is not None else {}
        self._positions = {TopicPartition(*tp): committed.get(tp, 0) for tp in partitions}
        self._paused.clear()
        self._kafka._notify()

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    # -- fetching --------------------------------------------------------------------------------

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        """Records of the owned (or assigned), unpaused partitions, waiting up to
        ``timeout_ms`` for some; a pending rebalance is applied first."""
        if max_records is not None and max_records < 1:
            raise ValueError("max_records must be a positive integer")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            self._check_open()
            changed = self._kafka._changed_event()
            if self._member_id is not None:
                await self._sync()
                self._check_open()
            batches = self._fetch(max_records or MAX_POLL_RECORDS)
            remaining_s = deadline - loop.time()
            if batches or remaining_s <= 0:
                return batches
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining_s):
                    await changed.wait()

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused.update(self._assigned(partitions))

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused.difference_update(self._assigned(partitions))
        self._kafka._notify()

    # -- offsets ---------------------------------------------------------------------------------

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Store ``offsets`` for the group; ``CommitFailed`` unless this member owns them all."""
        if self._group is None:
            raise KafkaPortError("commit needs a group_id")
        if any(offset < 0 for offset in offsets.values()):
            raise ValueError("offsets must be >= 0")
        if self._topics is None:  # a group consumer with manual assignment
            lost = set(offsets) - set(self._positions)
            if lost:
                raise CommitFailed(f"partitions not assigned: {sorted(lost)}")
            self._group.committed.update(offsets)
            return
        self._group.commit(self._member_id, offsets)

    async def committed(self, partition: TopicPartition) -> int | None:
        if self._group is None:
            raise KafkaPortError("committed needs a group_id")
        return self._group.committed.get(partition)

    async def position(self, partition: TopicPartition) -> int:
        (tp,) = self._assigned((partition,))
        return self._positions[tp]

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self._kafka._partition_count(topic)))

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        ends = {}
        for tp in partitions:
            state = self._kafka._topic(tp.topic, create=True)
            if state is None or not 0 <= tp.partition < len(state.partitions):
                raise UnknownTopic(f"{tp.topic}[{tp.partition}]")
            ends[TopicPartition(*tp)] = len(state.partitions[tp.partition])
        return ends

    async def lag(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """End minus position for the assigned ones of ``partitions`` (the rest left out)."""
        return {
            TopicPartition(*tp): max(0, len(self._kafka._log(tp)) - self._positions[tp])
            for tp in partitions
            if tp in self._positions
        }

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in self._assigned(partitions):
            self._seek(tp, 0)

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        for tp in self._assigned(partitions):
            self._seek(tp, len(self._kafka._log(tp)))

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if offset < 0:
            raise ValueError("offset must be >= 0")
        for tp in self._assigned((partition,)):
            self._seek(tp, offset)

    # -- internals -------------------------------------------------------------------------------

    def _subscribed_topics(self) -> tuple[str, ...]:
        topics = self._topics or ()
        for topic in topics:  # a subscription's metadata request creates unknown topics
            self._kafka._topic(topic, create=True)
        return topics

    def _join(self) -> None:
        if self._started and self._topics is not None and self._member_id is None:
            assert self._group is not None  # subscribe refuses a group-less consumer
            self._member_id = self._group.join(self._subscribed_topics())

    def _check_open(self) -> None:
        if self._closed or not self._started:
            raise BrokerUnavailable("consumer is stopped" if self._closed else "not started")

    def _assigned(self, partitions: Iterable[TopicPartition]) -> list[TopicPartition]:
        tps = [TopicPartition(*tp) for tp in partitions]
        missing = [tp for tp in tps if tp not in self._positions]
        if missing:
            raise KafkaPortError(f"partitions not assigned to this consumer: {sorted(missing)}")
        return tps

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = offset
        self._kafka._notify()

    async def _sync(self) -> None:
        """Apply the group's current generation: revoke everything, then take the new whole."""
        assert self._group is not None and self._member_id is not None
        generation = self._group.generation
        if self._generation != generation:
            self._synced = False
            revoked = set(self._positions)
            try:
                await self._call_listener(revoked, revoked=True)
            finally:  # released even if the listener is cancelled: no partition stays stuck
                if self._member_id is not None:
                    self._group.release(self._member_id, revoked)
                self._positions.clear()
                self._paused.clear()
            self._generation = generation
        if not self._synced and self._member_id is not None:
            taken = self._group.try_take(self._member_id)
            if taken is None:
                return
            self._synced = True
            self._positions = {tp: self._group.committed.get(tp, 0) for tp in taken}
            await self._call_listener(set(taken), revoked=False)

    async def _call_listener(self, partitions: set[TopicPartition], *, revoked: bool) -> None:
        if self._listener is None:
            return
        try:
            if revoked:
                await self._listener.on_partitions_revoked(partitions)
            else:
                await self._listener.on_partitions_assigned(partitions)
        except Exception:
            log.exception(
                "rebalance listener failed; the rebalance goes on",
                extra={"group_id": self._group_id, "revoked": revoked},
            )

    def _fetch(self, max_records: int) -> dict[TopicPartition, Sequence[Record]]:
        tps = sorted(tp for tp in self._positions if tp not in self._paused)
        if not tps:
            return {}
        start = self._round % len(tps)  # rotate, so one busy partition cannot starve the rest
        self._round += 1
        room = max_records
        batches: dict[TopicPartition, Sequence[Record]] = {}
        for tp in tps[start:] + tps[:start]:
            records: list[MemoryRecord | UnreadableRecord] = self._kafka._log(tp)
            position = self._positions[tp]
            if position > len(records):  # out of range: reset to earliest, as aiokafka does
                position = 0
            chunk = records[position : position + room]
            self._positions[tp] = position + len(chunk)
            if chunk:
                batches[tp] = chunk
                room -= len(chunk)
                if room == 0:
                    break
        return batches
