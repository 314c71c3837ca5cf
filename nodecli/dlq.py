"""``inference-node dlq list|replay``: inspect and replay dead letters.

Listing shows metadata only (reason, origin, size, digest): the payload is sealed to the
operator's DLQ key and stays sealed. Replay opens it with that private key and produces the
original bytes back to the original topic with ``og-attempts`` carried forward, so a message
that fails again comes back with a higher count instead of looping unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from infra.kafka import KafkaSettings
from schemas import topics as t
from schemas.topics import Topics

__all__ = ["list_dlq", "replay_dlq"]


async def _read_all(kafka: KafkaSettings, topic: str) -> list[Any]:
    consumer = AIOKafkaConsumer(**kafka.consumer_kwargs(None))
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        messages: list[Any] = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                messages.extend(records)
        return messages
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


def _summary(message: Any) -> dict[str, Any]:
    entry = json.loads(message.value)
    entry.pop("sealed_payload_hex", None)
    entry["dlq_partition"] = message.partition
    entry["dlq_offset"] = message.offset
    return dict(entry)


async def list_dlq(kafka: KafkaSettings, topics: Topics) -> list[dict[str, Any]]:
    return [_summary(m) for m in await _read_all(kafka, topics.dlq)]


async def replay_dlq(
    kafka: KafkaSettings, topics: Topics, key: PrivateKey, offsets: set[int] | None
) -> list[dict[str, Any]]:
    """Re-produce the selected entries (all when ``offsets`` is None) to their topics."""
    box = SealedBox(key)
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    replayed = []
    try:
        for message in await _read_all(kafka, topics.dlq):
            if offsets is not None and message.offset not in offsets:
                continue
            entry = json.loads(message.value)
            if entry.get("sealed_payload_hex") is None:
                replayed.append(
                    {
                        "dlq_offset": message.offset,
                        "replayed": False,
                        "why": "original too large to copy; read it at its original offset",
                    }
                )
                continue
            try:
                original = box.decrypt(bytes.fromhex(entry["sealed_payload_hex"]))
            except (CryptoError, ValueError):
                replayed.append(
                    {"dlq_offset": message.offset, "replayed": False, "why": "wrong key"}
                )
                continue
            await producer.send_and_wait(
                entry["original_topic"],
                original,
                headers=[(t.HEADER_ATTEMPTS, str(entry["attempts"]).encode())],
            )
            replayed.append(
                {"dlq_offset": message.offset, "replayed": True, "to": entry["original_topic"]}
            )
    finally:
        await producer.stop()
    return replayed
