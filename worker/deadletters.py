"""Operators' view of the dead-letter topic: list entries, replay them.

Anyone who can write the DLQ topic can forge an entry, so every entry is untrusted input:

- listing shows what decodes as a ``schemas.dlq.DlqEntry`` (reason, origin, size, digest; the
  payload stays sealed) and, for anything else (a tombstone, bytes that are not JSON, a forged
  shape), a line saying the entry is unreadable and why, never its content;
- replay opens the sealed payload with the operator's private key and produces the original
  bytes back only to a request topic of this namespace (``<ns>.infer.<model>``): a forged
  ``original_topic`` naming the settlement, registry or any other topic is refused. The
  original's ``og-attempts`` is carried forward, so a message that fails again comes back with
  a higher count instead of looping unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from infra.kafka.ports import Kafka, Record, TopicPartition
from schemas import topics as t
from schemas.codec import Decoded, decode
from schemas.dlq import DlqEntry
from schemas.topics import Topics

__all__ = ["DlqLine", "ReplayResult", "list_dlq", "replay_dlq"]

_POLL_MS = 500


@dataclass(frozen=True)
class DlqLine:
    """One DLQ message as listed: its entry (payload left out), or why it is unreadable."""

    dlq_partition: int
    dlq_offset: int
    entry: DlqEntry | None
    unreadable: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dlq_partition": self.dlq_partition, "dlq_offset": self.dlq_offset}
        if self.entry is not None:
            out.update(self.entry.model_dump(mode="json", exclude={"sealed_payload_hex"}))
        else:
            out["unreadable"] = self.unreadable
        return out


@dataclass(frozen=True)
class ReplayResult:
    dlq_offset: int
    replayed: bool
    to: str | None = None
    why: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


async def _read_all(kafka: Kafka, topic: str) -> list[Record]:
    consumer = kafka.consumer(None)
    await consumer.start()
    try:
        partitions = await consumer.partitions_for(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        messages: list[Record] = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=_POLL_MS)).values():
                messages.extend(records)
        return messages
    finally:
        await consumer.stop()


def _line(message: Record) -> DlqLine:
    decoded = decode(message.value, DlqEntry)
    if isinstance(decoded, Decoded):
        return DlqLine(message.partition, message.offset, decoded.message)
    return DlqLine(message.partition, message.offset, None, decoded.reason)


async def list_dlq(kafka: Kafka, topics: Topics) -> list[DlqLine]:
    return [_line(m) for m in await _read_all(kafka, topics.dlq)]


async def replay_dlq(
    kafka: Kafka, topics: Topics, key: PrivateKey, offsets: set[int] | None
) -> list[ReplayResult]:
    """Re-produce the selected entries (all when ``offsets`` is None) to their request topics."""
    box = SealedBox(key)
    producer = kafka.producer()
    await producer.start()
    results = []
    try:
        for message in await _read_all(kafka, topics.dlq):
            if offsets is not None and message.offset not in offsets:
                continue
            line = _line(message)
            result = _refusal(line, topics)
            if result is None:
                assert line.entry is not None and line.entry.sealed_payload_hex is not None
                try:
                    original = box.decrypt(bytes.fromhex(line.entry.sealed_payload_hex))
                except (CryptoError, ValueError):
                    result = ReplayResult(message.offset, False, why="does not open with this key")
                else:
                    await producer.send_and_wait(
                        line.entry.original_topic,
                        original,
                        headers=[(t.HEADER_ATTEMPTS, str(line.entry.attempts).encode())],
                    )
                    result = ReplayResult(message.offset, True, to=line.entry.original_topic)
            results.append(result)
    finally:
        await producer.stop()
    return results


def _refusal(line: DlqLine, topics: Topics) -> ReplayResult | None:
    if line.entry is None:
        return ReplayResult(line.dlq_offset, False, why=f"unreadable entry ({line.unreadable})")
    if topics.model_of(line.entry.original_topic) is None:
        return ReplayResult(line.dlq_offset, False, why="not a request topic of this namespace")
    if line.entry.sealed_payload_hex is None:
        why = "original too large to copy; read it at its original offset"
        return ReplayResult(line.dlq_offset, False, why=why)
    return None
