"""Publishing anchored batches (``schemas.batches``): to the compacted ``<ns>.batches`` topic
and, when configured, to a directory (``OG_SETTLEMENT_PUBLISH_DIR``).

A published batch is derived from the ledger alone: its members' stored envelopes give the
leaf values, the batch row its root and the contract's index. The batcher therefore never
keeps one anywhere but in the ledger, and the order of operations is crash-safe:

1. the batch is anchored with ``batchRef = sha256(document)`` (``settlement.batcher``);
2. ``mark_anchored`` records the index and the ``batchRef`` the chain's event carries;
3. the document is rebuilt, checked against that ``batchRef``, and delivered to every sink;
4. ``mark_published``.

A crash anywhere after 2 leaves the batch anchored and unpublished: the next round (after a
restart, the first) publishes it again. Delivery is idempotent: the file is replaced
atomically with the same bytes, and the topic is compacted on the batch index.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from infra.kafka.ports import Producer
from schemas.batches import PublishedBatch, batch_bytes, batch_key, batch_ref, published_batch
from schemas.merkle import LEAF_TYPES, leaf_hash, leaf_values
from schemas.topics import HEADER_SCHEMA_VERSION
from settlement.ledger.base import BatchRow, Ledger, LedgerError

__all__ = [
    "BatchPublisher",
    "BatchSink",
    "DirectorySink",
    "PublicationError",
    "TopicSink",
    "batch_document",
    "batch_file_name",
    "batch_leaf_values",
]

log = logging.getLogger(__name__)


class PublicationError(LedgerError):
    """The ledger cannot rebuild a batch's published document as the chain committed to it."""


def batch_leaf_values(ledger: Ledger, batch: BatchRow) -> list[tuple[bytes, ...]]:
    """The batch's leaf values by leaf index, from its stored envelopes; each checked against
    the leaf hash stored with the record (the tree was built from those)."""
    values = []
    for stored, envelope in ledger.batch_envelopes(batch.id):
        row = leaf_values(envelope)
        if "0x" + leaf_hash(LEAF_TYPES, row).hex() != stored:
            raise PublicationError(f"batch {batch.id}: a stored envelope no longer gives its leaf")
        values.append(row)
    if len(values) != batch.count:
        raise PublicationError(f"batch {batch.id}: {len(values)} members, not {batch.count}")
    return values


def batch_document(
    batch: BatchRow, batch_index: int, values: Sequence[tuple[bytes, ...]]
) -> PublishedBatch:
    """The published document of ``batch`` at ``batch_index``; its root must be the batch's."""
    document = published_batch(batch_index, values)
    if document.root != batch.root:
        raise PublicationError(f"batch {batch.id}: its leaves do not make its root")
    return document


def batch_file_name(batch_index: int) -> str:
    """``batch-<index, 10 digits or more>.json``: names sort in batch order."""
    return f"batch-{batch_index:010d}.json"


class BatchSink(Protocol):
    """Somewhere a published batch goes. ``deliver`` is idempotent and returns only once the
    document is durable there."""

    name: str

    async def deliver(self, batch: PublishedBatch, data: bytes) -> None: ...


class DirectorySink:
    """``<dir>/batch-<index>.json``, written to a temporary file, fsynced and renamed."""

    name = "directory"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def deliver(self, batch: PublishedBatch, data: bytes) -> None:
        await asyncio.to_thread(self._write, batch_file_name(batch.batch_index), data)

    def _write(self, name: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        tmp = path.with_name(f".{name}.tmp")
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power loss
        finally:
            os.close(fd)


class TopicSink:
    """The compacted ``<ns>.batches`` topic; key: the batch index (``schemas.batches``)."""

    name = "topic"

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def deliver(self, batch: PublishedBatch, data: bytes) -> None:
        await self.producer.send_and_wait(
            self.topic,
            data,
            key=batch_key(batch.batch_index),
            headers=[(HEADER_SCHEMA_VERSION, str(batch.schema_version).encode())],
        )


class BatchPublisher:
    """Delivers anchored batches to its sinks and records it in the ledger."""

    def __init__(self, ledger: Ledger, sinks: Sequence[BatchSink]) -> None:
        self._ledger = ledger
        self._sinks = tuple(sinks)
        self.published = 0
        """Batches delivered by this publisher (republications included)."""

    async def publish(
        self, batch: BatchRow, document: PublishedBatch | None = None
    ) -> PublishedBatch:
        """Deliver ``batch`` (anchored) everywhere, then mark it published. ``document``: its
        document when the caller built it already (else rebuilt from the ledger); either way
        it must hash to the ``batch_ref`` recorded from the chain."""
        if batch.status != "anchored" or batch.batch_index is None or batch.batch_ref is None:
            raise PublicationError(f"batch {batch.id} is not anchored with a batchRef")
        if document is None:
            values = await asyncio.to_thread(batch_leaf_values, self._ledger, batch)
            document = batch_document(batch, batch.batch_index, values)
        if "0x" + batch_ref(document).hex() != batch.batch_ref:
            raise PublicationError(
                f"batch {batch.id}: its document does not hash to the batchRef on chain"
            )
        data = batch_bytes(document)
        for sink in self._sinks:
            await sink.deliver(document, data)
        await asyncio.to_thread(self._ledger.mark_published, batch.id)
        self.published += 1
        log.info(
            "batch published",
            extra={"batch_index": batch.batch_index, "records": batch.count},
        )
        return document

    async def publish_due(self) -> int:
        """Publish every anchored batch still due (after a crash or a failed delivery)."""
        done = 0
        while batches := await asyncio.to_thread(self._ledger.unpublished_batches, 100):
            for batch in batches:
                await self.publish(batch)
                done += 1
        return done
