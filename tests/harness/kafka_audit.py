"""Kafka port wrappers that let a test watch a service from the inside, on any backend.

``AuditedConsumer`` passes every call through, and reports each batch fetched and each commit
(before it reaches the cluster) to callbacks; ``fail_commits(n)`` makes the next ``n`` commits
raise ``BrokerUnavailable`` without committing, as a process dying between its work and its
commit would leave things. ``AuditedProducer`` reports each message once the cluster has
acknowledged it. ``AuditedKafka`` wraps the group consumers a service builds itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence

from infra.kafka.ports import (
    BrokerUnavailable,
    Consumer,
    Headers,
    Kafka,
    Producer,
    Record,
    TopicPartition,
)
from tests.harness.forwarding import ForwardingConsumer

__all__ = ["AuditedConsumer", "AuditedKafka", "AuditedProducer", "request_id_of"]

OnFetch = Callable[[Mapping[TopicPartition, Sequence[Record]]], None]
OnCommit = Callable[[Mapping[TopicPartition, int]], None]
OnAck = Callable[[str, bytes | None, bytes | None], None]


def _ignore(*_: object) -> None:
    return None


def request_id_of(value: bytes | None) -> str | None:
    """The request id of a request, reply or settlement record (None: not one of those)."""
    try:
        document = json.loads(value or b"")
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    envelope = document.get("envelope")
    rid = envelope.get("request_id") if isinstance(envelope, dict) else document.get("request_id")
    return rid if isinstance(rid, str) else None


class AuditedConsumer(ForwardingConsumer):
    def __init__(
        self, inner: Consumer, *, on_fetch: OnFetch = _ignore, on_commit: OnCommit = _ignore
    ) -> None:
        super().__init__(inner)
        self._on_fetch = on_fetch
        self._on_commit = on_commit
        self._failing_commits = 0
        self._failing_fetches = False

    def fail_commits(self, count: int) -> None:
        self._failing_commits = count

    def fail_fetches(self) -> None:
        """Every fetch from now on raises ``BrokerUnavailable`` (a reader that dies)."""
        self._failing_fetches = True

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        if self._failing_fetches:
            raise BrokerUnavailable("fetch failed (injected)")
        batches = await self.inner.getmany(timeout_ms=timeout_ms, max_records=max_records)
        if batches:
            self._on_fetch(batches)
        return batches

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if self._failing_commits > 0:
            self._failing_commits -= 1
            raise BrokerUnavailable("injected: the process died before its commit")
        self._on_commit(offsets)
        await self.inner.commit(offsets)


class AuditedProducer(Producer):
    def __init__(self, inner: Producer, on_ack: OnAck) -> None:
        self.inner = inner
        self._on_ack = on_ack

    @property
    def max_message_bytes(self) -> int:
        return self.inner.max_message_bytes

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> Awaitable[object]:
        ack = await self.inner.send(topic, value, key=key, headers=headers)

        async def acked() -> object:
            result = await ack
            self._on_ack(topic, key, value)
            return result

        # A task, not a bare coroutine: an ack nobody awaits must not warn.
        return asyncio.ensure_future(acked())

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> None:
        await (await self.send(topic, value, key=key, headers=headers))


class AuditedKafka(Kafka):
    """``inner``, with its group consumers wrapped in ``AuditedConsumer`` (kept in
    ``consumers``); group-less consumers (topic readers) are wrapped too, without audit, and
    kept in ``readers``; producers are passed through."""

    def __init__(
        self, inner: Kafka, *, on_fetch: OnFetch = _ignore, on_commit: OnCommit = _ignore
    ) -> None:
        self.inner = inner
        self._on_fetch = on_fetch
        self._on_commit = on_commit
        self.consumers: list[AuditedConsumer] = []
        self.readers: list[AuditedConsumer] = []

    def consumer(self, group_id: str | None) -> Consumer:
        consumer = self.inner.consumer(group_id)
        if group_id is None:
            reader = AuditedConsumer(consumer)
            self.readers.append(reader)
            return reader
        audited = AuditedConsumer(consumer, on_fetch=self._on_fetch, on_commit=self._on_commit)
        self.consumers.append(audited)
        return audited

    def producer(self) -> Producer:
        return self.inner.producer()
