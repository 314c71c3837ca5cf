"""The raw aiokafka loop the benchmarks measure the worker against: the same Kafka work as the
worker, and nothing else (floor A), optionally plus the cryptographic floor (floor B).

Same work as ``worker.intake`` + ``worker.publish``, message for message: a group-managed
subscription with the shipped client settings (``KafkaSettings``: acks=all, linger, batch
size, fetch wait), at most ``max_in_flight`` requests in flight; per request a reply keyed by
the request id (the request's own key) on the replies topic, then, once that reply is
acknowledged, a settlement record on the settlement topic keyed as the worker keys it; both
with the worker's headers (``og-schema-version`` and a fresh ``traceparent``) and the worker's
value sizes; ``send()`` then awaiting the delivery future; the answered prefix of each
partition committed every ``commit_interval_s``. Optionally the worker's per-partition window
too (records fetched beyond it handed back by a seek, the partition paused).

It works a fetched batch at a time (one task per batch, not per request): the cheapest way to
do this work in asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.kafka import KafkaSettings
from schemas.signing import ChainSigner, Signer
from schemas.topics import HEADER_SCHEMA_VERSION, HEADER_TRACEPARENT, Topics
from schemas.version import SCHEMA_VERSION

__all__ = ["Crypto", "RawLoop", "Shape", "crypto_floor"]

Crypto = Callable[[bytes, bytes], None]


@dataclass(frozen=True)
class Shape:
    """What the worker published per request, which the raw loop copies."""

    reply_bytes: int
    record_bytes: int
    settlement_key: bytes | None
    """The key of every settlement record (the node id), or None: each request's id."""

    @classmethod
    def of(cls, replies: Sequence[Any], records: Sequence[Any]) -> Shape:
        """From the worker's own replies and settlement records (aiokafka messages)."""
        first = records[0]
        request_id = json.loads(first.value)["envelope"]["request_id"].encode()
        return cls(
            round(sum(len(m.value) for m in replies) / len(replies)),
            round(sum(len(m.value) for m in records) / len(records)),
            None if first.key == request_id else first.key,
        )

    @property
    def keying(self) -> str:
        """How the worker keys settlement records: ``request_id`` or ``node_id``."""
        return "request_id" if self.settlement_key is None else "node_id"


def crypto_floor(signer: Signer, chain: ChainSigner) -> Crypto:
    """The cryptography of one v2 result: a sha256 of the payload and one of the output, an
    ed25519 and a secp256k1 EIP-191 signature over their digest (``schemas.signing``)."""

    def sign(payload: bytes, output: bytes) -> None:
        digest = hashlib.sha256(
            hashlib.sha256(payload).digest() + hashlib.sha256(output).digest()
        ).digest()
        signer.sign_digest(digest)
        chain.sign_digest(digest)

    return sign


def _traceparent() -> bytes:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01".encode()


class _Ordered:
    """Per partition: fetched batches in order, committed as a contiguous answered prefix."""

    def __init__(self) -> None:
        self._pending: dict[Any, deque[list[Any]]] = {}

    def admit(self, tp: Any, next_offset: int) -> list[Any]:
        entry = [next_offset, False]
        self._pending.setdefault(tp, deque()).append(entry)
        return entry

    def committable(self) -> dict[Any, int]:
        out = {}
        for tp, queue in self._pending.items():
            while queue and queue[0][1]:
                out[tp] = queue.popleft()[0]
        return out


class RawLoop:
    def __init__(
        self,
        kafka: KafkaSettings,
        request_topic: str,
        topics: Topics,
        group_id: str,
        shape: Shape,
        *,
        crypto: Crypto | None = None,
        window: int | None = None,
        max_in_flight: int = 256,
        commit_interval_s: float = 0.1,
    ) -> None:
        self._producer = AIOKafkaProducer(**kafka.producer_kwargs())
        self._consumer = AIOKafkaConsumer(request_topic, **kafka.consumer_kwargs(group_id))
        self._topics = topics
        self._shape = shape
        self._crypto = crypto
        self._limit = window if window is not None else max_in_flight
        self._max_in_flight = max_in_flight
        self._commit_interval_s = commit_interval_s
        self._reply = b"r" * shape.reply_bytes
        self._record = b"s" * shape.record_bytes
        self._schema = (HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())
        self._ordered = _Ordered()
        self._in_flight = 0
        self._unanswered: dict[Any, int] = {}
        self._room = asyncio.Event()
        self.answered = 0

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._producer.stop()

    async def run(self, done: Callable[[], bool]) -> None:
        """Serve until ``done()``, then finish what is in flight and commit it."""
        committer = asyncio.create_task(self._commit_loop())
        tasks: set[asyncio.Task[None]] = set()
        paused: set[Any] = set()
        consumer = self._consumer
        try:
            while not done():
                for tp in [tp for tp in paused if self._unanswered[tp] < self._limit]:
                    consumer.resume(tp)
                    paused.discard(tp)
                full = paused and paused >= consumer.assignment()
                if self._in_flight >= self._max_in_flight or full:
                    self._room.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.1):
                            await self._room.wait()
                    continue
                batches = await consumer.getmany(
                    timeout_ms=100, max_records=self._max_in_flight - self._in_flight
                )
                for tp, fetched in batches.items():
                    free = self._limit - self._unanswered.get(tp, 0)
                    batch = fetched[:free]
                    if len(fetched) > free:  # beyond the partition's window: handed back
                        consumer.seek(tp, fetched[free].offset)
                        consumer.pause(tp)
                        paused.add(tp)
                    if not batch:
                        continue
                    self._in_flight += len(batch)
                    self._unanswered[tp] = self._unanswered.get(tp, 0) + len(batch)
                    entry = self._ordered.admit(tp, batch[-1].offset + 1)
                    task = asyncio.create_task(self._answer(tp, batch, entry))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                for task in [t for t in tasks if t.done()]:
                    task.result()
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
        offsets = self._ordered.committable()
        if offsets:
            await consumer.commit(offsets)

    async def _answer(self, tp: Any, batch: Sequence[Any], entry: list[Any]) -> None:
        producer, topics = self._producer, self._topics
        headers = [[self._schema, (HEADER_TRACEPARENT, _traceparent())] for _ in batch]
        replies = []
        for msg, h in zip(batch, headers, strict=True):
            if self._crypto is not None:
                self._crypto(msg.value, self._reply)
            replies.append(await producer.send(topics.replies, self._reply, key=msg.key, headers=h))
        records = []
        for msg, ack, h in zip(batch, replies, headers, strict=True):
            await ack  # the record only once its reply is acknowledged, as the worker does
            key = self._shape.settlement_key or msg.key
            records.append(await producer.send(topics.settlement, self._record, key=key, headers=h))
        for ack in records:
            await ack  # answered: its window slot is free (committed with its batch)
            self._in_flight -= 1
            self._unanswered[tp] -= 1
            self.answered += 1
            self._room.set()
        entry[1] = True

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self._commit_interval_s)
            offsets = self._ordered.committable()
            if offsets:
                await self._consumer.commit(offsets)
