"""Publishing replies, settlement records and dead letters, acknowledged by the broker.

``publish_outcome`` returns only when the broker has acknowledged both the reply and the
settlement record (acks=all), which is what lets intake commit the request's offset afterwards.
The settlement record is sent only once the reply is acknowledged: a result is never booked
for a reply the cluster refused.

Trace context: every message published for a request carries the request's ``traceparent``
(intake replaces it with one naming the worker's span), so the reply, the settlement record and
a dead letter all join the request's trace.

Failures are the producer port's exceptions (``infra.kafka.ports``); what to do about them is
the intake's decision (``worker.intake``): a reply too large or a reply topic that does not
exist concern one record, a broker that does not answer concerns the whole worker.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from nacl.public import PublicKey, SealedBox

from infra.kafka.ports import Headers, MessageTooLarge, Producer
from schemas import topics as t
from schemas.codec import encode
from schemas.dlq import MAX_DLQ_COPY_BYTES, DlqEntry
from schemas.results import SealedReply, StreamChunk
from schemas.topics import Topics
from schemas.version import SCHEMA_VERSION
from worker.metrics import WorkerMetrics
from worker.pipeline import Outcome

__all__ = ["Publisher"]

_HEADROOM_BYTES = 1024
"""Room for headers and the record batch framing beside a reply's value and key."""
_SEAL_OVERHEAD_BYTES = 48
"""What ``SealedBox`` adds to a message: an ephemeral public key and a MAC."""
_SCHEMA_HEADER = (t.HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())


def _trace_headers(headers: Headers) -> list[tuple[str, bytes | None]]:
    return [(k, v) for k, v in headers if k == t.HEADER_TRACEPARENT]


class Publisher:
    def __init__(
        self,
        producer: Producer,
        topics: Topics,
        dlq_key: PublicKey,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._producer = producer
        self._topics = topics
        self._dlq_box = SealedBox(dlq_key)
        self._metrics = metrics

    @property
    def max_message_bytes(self) -> int:
        return self._producer.max_message_bytes

    @property
    def _dlq_copy_limit_bytes(self) -> int:
        """The largest original a DLQ entry copies: sealed and hex-encoded it doubles, and the
        entry must still fit this producer's limit (a dead letter too large to publish would
        stop the worker on that record at every restart)."""
        room = (self._producer.max_message_bytes - 2 * _HEADROOM_BYTES) // 2 - _SEAL_OVERHEAD_BYTES
        return max(0, min(MAX_DLQ_COPY_BYTES, room))

    async def publish_outcome(
        self, outcome: Outcome, reply_to: str | None, request_headers: Headers
    ) -> None:
        headers = [_SCHEMA_HEADER, *_trace_headers(request_headers)]
        key = outcome.reply.request_id.encode()
        reply = encode(outcome.reply)
        if len(reply) + len(key) + _HEADROOM_BYTES > self._producer.max_message_bytes:
            # Checked before anything is sent: a settlement record must never be booked for
            # a result its client cannot receive.
            raise MessageTooLarge("reply")
        started = time.perf_counter()
        await self._producer.send_and_wait(
            reply_to or self._topics.replies, reply, key=key, headers=headers
        )
        if outcome.record is not None:
            # Only once the reply is acknowledged: a reply the cluster refuses (its topic does
            # not exist) is dead-lettered, and its result must not be booked meanwhile. The
            # client is not kept waiting: it has the reply already; only the commit waits.
            # Keyed by request id: one node's records spread over every settlement partition
            # (several settlement consumers share them), and copies of one request's record
            # land on one partition, judged in order (booked once, then replay).
            await self._producer.send_and_wait(
                self._topics.settlement, encode(outcome.record), key=key, headers=headers
            )
        if self._metrics is not None:
            self._metrics.message_published("reply", time.perf_counter() - started)

    async def publish_chunk(
        self, chunk: StreamChunk | SealedReply, reply_to: str | None, request_headers: Headers
    ) -> None:
        """Queue one stream chunk without waiting for its acknowledgement.

        Chunks and the final reply share the key (the request id), so they land on one
        partition in send order; the final reply is acknowledged only after the chunks before
        it. A lost chunk costs nothing that matters: the signed result carries the whole output.
        """
        headers = [_SCHEMA_HEADER, *_trace_headers(request_headers)]
        await self._producer.send(
            reply_to or self._topics.replies,
            encode(chunk),
            key=chunk.request_id.encode(),
            headers=headers,
        )
        if self._metrics is not None:
            self._metrics.message_published("chunk")

    async def dead_letter(
        self,
        raw: bytes | None,
        reason: str,
        *,
        topic: str,
        partition: int,
        offset: int,
        attempts: int,
        request_headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> None:
        """Dead-letter a message that cannot be answered (see ``schemas.dlq``)."""
        body = raw or b""
        copied = len(body) <= self._dlq_copy_limit_bytes
        entry = DlqEntry(
            reason=reason[:512],
            original_topic=topic,
            original_partition=partition,
            original_offset=offset,
            attempts=max(1, attempts),
            size_bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            sealed_payload_hex=self._dlq_box.encrypt(body).hex() if copied else None,
            dead_lettered_unix_ms=time.time_ns() // 1_000_000,
        )
        headers = [
            _SCHEMA_HEADER,
            (t.HEADER_REASON, entry.reason.encode()),
            (t.HEADER_ORIGINAL_TOPIC, topic.encode()),
            (t.HEADER_ORIGINAL_PARTITION, str(partition).encode()),
            (t.HEADER_ORIGINAL_OFFSET, str(offset).encode()),
            (t.HEADER_ATTEMPTS, str(entry.attempts).encode()),
            *_trace_headers(request_headers),
        ]
        started = time.perf_counter()
        await self._producer.send_and_wait(self._topics.dlq, encode(entry), headers=headers)
        if self._metrics is not None:
            self._metrics.message_published("dead_letter", time.perf_counter() - started)
