"""Publishing replies, settlement records and dead letters, acknowledged by the broker.

``publish_outcome`` returns only when the broker has acknowledged both the reply and the
settlement record (acks=all), which is what lets intake commit the request's offset afterwards.

Trace context: every message published for a request carries the request's ``traceparent``
(intake replaces it with one naming the worker's span), so the reply, the settlement record and
a dead letter all join the request's trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

from nacl.public import PublicKey, SealedBox

from schemas import topics as t
from schemas.codec import encode
from schemas.results import StreamChunk
from schemas.topics import Topics
from schemas.version import SCHEMA_VERSION
from worker.metrics import WorkerMetrics
from worker.pipeline import Outcome

__all__ = ["Publisher"]

Headers = list[tuple[str, bytes]]
MAX_DLQ_COPY_BYTES = 400_000


def _trace_headers(headers: Sequence[tuple[str, bytes]]) -> Headers:
    return [(k, v) for k, v in headers if k == t.HEADER_TRACEPARENT]


class Publisher:
    def __init__(
        self,
        producer: Any,
        topics: Topics,
        dlq_key: PublicKey,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._producer = producer
        self._topics = topics
        self._dlq_box = SealedBox(dlq_key)
        self._metrics = metrics

    async def publish_outcome(
        self, outcome: Outcome, reply_to: str | None, request_headers: Sequence[tuple[str, bytes]]
    ) -> None:
        headers = [
            (t.HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode()),
            *_trace_headers(request_headers),
        ]
        key = outcome.reply.request_id.encode()
        started = time.perf_counter()
        sends = [
            await self._producer.send(
                reply_to or self._topics.replies, encode(outcome.reply), key=key, headers=headers
            )
        ]
        if outcome.record is not None:
            sends.append(
                await self._producer.send(
                    self._topics.settlement,
                    encode(outcome.record),
                    key=outcome.record.envelope.node_id.encode(),
                    headers=headers,
                )
            )
        await asyncio.gather(*sends)
        if self._metrics is not None:
            self._metrics.message_published("reply", time.perf_counter() - started)

    async def publish_chunk(
        self,
        chunk: StreamChunk,
        reply_to: str | None,
        request_headers: Sequence[tuple[str, bytes]],
    ) -> None:
        """Queue one stream chunk without waiting for its acknowledgement.

        Chunks and the final reply share the key (the request id), so they land on one
        partition in send order; the final reply is acknowledged only after the chunks before
        it. A lost chunk costs nothing that matters: the signed result carries the whole output.
        """
        headers = [
            (t.HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode()),
            *_trace_headers(request_headers),
        ]
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
        request_headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Dead-letter a message that cannot be answered.

        The original bytes may hold a prompt, so they travel sealed to the operator's DLQ key
        (X25519 sealed box): the DLQ never holds user data in clear, yet nothing is lost and
        the operator can open and replay the entry.
        """
        body = raw or b""
        # The sealed copy is hex (twice the size): copying a message near the 1 MB limit would
        # make the DLQ entry itself too large to produce. Such entries keep the hash and the
        # original's coordinates; the original stays on its topic (within retention).
        copied = len(body) <= MAX_DLQ_COPY_BYTES
        entry = {
            "schema_version": SCHEMA_VERSION,
            "type": "dlq_entry",
            "reason": reason,
            "original_topic": topic,
            "original_partition": partition,
            "original_offset": offset,
            "attempts": attempts,
            "size_bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "sealed_payload_hex": self._dlq_box.encrypt(body).hex() if copied else None,
            "dead_lettered_unix_ms": time.time_ns() // 1_000_000,
        }
        headers = [
            (t.HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode()),
            (t.HEADER_REASON, reason.encode()[:512]),
            (t.HEADER_ORIGINAL_TOPIC, topic.encode()),
            (t.HEADER_ORIGINAL_PARTITION, str(partition).encode()),
            (t.HEADER_ORIGINAL_OFFSET, str(offset).encode()),
            (t.HEADER_ATTEMPTS, str(attempts).encode()),
            *_trace_headers(request_headers),
        ]
        started = time.perf_counter()
        await self._producer.send_and_wait(
            self._topics.dlq, json.dumps(entry).encode(), key=None, headers=headers
        )
        if self._metrics is not None:
            self._metrics.message_published("dead_letter", time.perf_counter() - started)
