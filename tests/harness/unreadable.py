"""Producing a record a Kafka client cannot read: a header key that is not UTF-8.

The Kafka protocol allows any bytes there, and a careless or hostile producer can write them;
aiokafka's readers raise on them inside ``getmany``. No client API writes such a key, so this
builds the record batch through aiokafka's pure-Python builder with a key whose ``encode``
returns invalid UTF-8 (test harness only)."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.record.default_records import (  # type: ignore[import-untyped]
    _DefaultRecordBatchBuilderPy,
)

__all__ = ["produce_unreadable"]

_MAGIC_V2 = 2
_NO_COMPRESSION = 0
_BATCH_BYTES = 16_384


class _NotUtf8Key(str):
    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe-og"


async def produce_unreadable(bootstrap: str, topic: str, partition: int, value: bytes) -> int:
    """Append one record whose header key is not UTF-8; returns its offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._builder = _DefaultRecordBatchBuilderPy(
            _MAGIC_V2, _NO_COMPRESSION, 0, -1, -1, -1, _BATCH_BYTES
        )
        batch.append(timestamp=None, key=None, value=value, headers=[(_NotUtf8Key("h"), b"v")])
        metadata = await (await producer.send_batch(batch, topic, partition=partition))
        return int(metadata.offset)
    finally:
        await producer.stop()
