"""Merkle batching and anchoring, crash-safe by construction.

A batch goes through two durable states in the ledger:

1. ``built``: in ONE ledger transaction the batch row (with its root) is inserted and its
   records are assigned their leaf index. A crash before that commit leaves the records
   unbatched; after it, the batch exists and will be anchored.
2. ``anchored``: the transaction hash, block, gas, the contract's batch index and the
   ``batchRef`` are recorded once the root is on chain.

On start-up every ``built`` batch is resumed. Before sending, the chain is asked whether the
root is already settled (a crash after the transaction was mined but before it was recorded),
and the contract itself refuses a root twice, so a root is never anchored twice and a record
is never in two batches.

``batchRef`` is the SHA-256 of the batch's published document (``schemas.batches``), which
names the index the contract gives the batch: ``settle_batch`` is handed a function of that
index. With a ``BatchPublisher`` the document is then published (``settlement.publisher``:
rebuilt from the ledger, so a crash before or during publication is repaired by the next
round, which publishes every anchored batch still due before anchoring anything new).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infra.kafka.ports import KafkaPortError
from schemas.batches import batch_ref
from schemas.merkle import MerkleTree
from settlement.chain import AnchorChain, Anchored, ChainError, DuplicateRoot
from settlement.failpoints import failpoint
from settlement.ledger.base import BatchMember, BatchRow, Leaf, Ledger
from settlement.metrics import SettlementMetrics
from settlement.publisher import BatchPublisher, batch_document, batch_leaf_values

__all__ = ["Batcher", "BatcherConfig"]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class BatcherConfig:
    max_records: int = 1000
    max_age_s: float = 5.0
    tick_s: float = 0.5
    retry_backoff_s: float = 2.0


class Batcher:
    def __init__(
        self,
        ledger: Ledger,
        chain: AnchorChain,
        config: BatcherConfig,
        *,
        clock_ms: Callable[[], int] = _now_ms,
        metrics: SettlementMetrics | None = None,
        publisher: BatchPublisher | None = None,
    ) -> None:
        self._ledger = ledger
        self._publisher = publisher
        self._metrics = metrics
        self._chain = chain
        self._config = config
        self._clock_ms = clock_ms
        self._stopping = asyncio.Event()
        self.last_anchored: Anchored | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Anchor open batches, then close new ones by size or age until stopped."""
        while not self._stopping.is_set():
            try:
                await self.step()
                delay_s = self._config.tick_s
            except ChainError as e:
                # The chain is down or refused us: the batch stays ``built`` and is retried.
                log.warning("anchoring failed; will retry", extra={"error": e.reason or "chain"})
                if self._metrics is not None:
                    self._metrics.anchor_failed()
                delay_s = self._config.retry_backoff_s
            except (KafkaPortError, OSError) as e:
                # Publication failed: the batch stays anchored and due, published next round.
                log.warning("publishing failed; will retry", extra={"error": type(e).__name__})
                delay_s = self._config.retry_backoff_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._stopping.wait()

    async def step(self) -> None:
        """One round: publish anchored batches still due, finish open batches, anchor each
        ``individual`` record on its own (a tree of one leaf: its root is the leaf), then
        build and anchor at most one batch of ``batch`` records. ``private`` records are
        booked and never anchored (nor published)."""
        if self._publisher is not None:
            await self._publisher.publish_due()
        for batch in await asyncio.to_thread(self._ledger.open_batches):
            await self._anchor(batch)
        for leaf in await asyncio.to_thread(self._ledger.unbatched, 100, "individual"):
            built = await self._build([leaf])
            if built is not None:
                await self._anchor(built)
        if await self._due():
            records = await asyncio.to_thread(self._ledger.unbatched, self._config.max_records)
            built = await self._build(records)
            if built is not None:
                await self._anchor(built)

    async def _due(self) -> bool:
        oldest = await asyncio.to_thread(self._ledger.oldest_unbatched_unix_ms)
        if oldest is None:
            return False
        if self._clock_ms() - oldest >= self._config.max_age_s * 1000:
            return True
        pending = await asyncio.to_thread(self._ledger.unbatched_count)
        if self._metrics is not None:
            self._metrics.set_unbatched(pending)
        return pending >= self._config.max_records

    async def _build(self, records: Sequence[Leaf]) -> BatchRow | None:
        if not records:
            return None
        leaves = {(r.request_id, r.node_id): bytes.fromhex(r.leaf_hash[2:]) for r in records}
        tree = MerkleTree(leaves.values())
        members = [
            BatchMember(request_id, node_id, tree.index_of(leaf), "0x" + leaf.hex())
            for (request_id, node_id), leaf in leaves.items()
        ]
        batch_id = await asyncio.to_thread(
            self._ledger.create_batch, "0x" + tree.root.hex(), members
        )
        failpoint("after_batch_built")
        if self._metrics is not None:
            self._metrics.batch_built(len(members))
        log.info("batch built", extra={"batch_id": batch_id, "records": len(members)})
        return await asyncio.to_thread(self._ledger.batch, batch_id)

    async def _anchor(self, batch: BatchRow) -> None:
        root = bytes.fromhex(batch.root.removeprefix("0x"))
        values = await asyncio.to_thread(batch_leaf_values, self._ledger, batch)

        def ref_at(batch_index: int) -> bytes:
            return batch_ref(batch_document(batch, batch_index, values))

        anchored = await self._chain.find_anchor(root)
        if anchored is None:
            try:
                anchored = await self._chain.settle_batch(root, batch.count, ref_at)
            except DuplicateRoot:
                # Settled between our look-up and the send (another relayer, or a race).
                anchored = await self._chain.find_anchor(root)
                if anchored is None:
                    raise
            failpoint("after_tx_sent")
        document = batch_document(batch, anchored.batch_index, values)
        ref: str | None = "0x" + batch_ref(document).hex()
        if ref != anchored.batch_ref:
            # Anchored by a version that labelled batches with their id (a crash across the
            # upgrade): the chain does not commit to this document, so it is never published.
            log.error("batch anchored with a foreign batchRef", extra={"batch_id": batch.id})
            ref = None
        await asyncio.to_thread(
            self._ledger.mark_anchored,
            batch.id,
            anchored.tx_hash,
            anchored.block_number,
            anchored.gas_used,
            anchored.batch_index,
            ref,
        )
        self.last_anchored = anchored
        if self._metrics is not None:
            self._metrics.batch_anchored(batch.count, anchored.gas_used)
        log.info(
            "batch anchored",
            extra={"batch_id": batch.id, "records": batch.count, "gas_used": anchored.gas_used},
        )
        failpoint("after_batch_anchored")
        if self._publisher is not None and ref is not None:
            row = await asyncio.to_thread(self._ledger.batch, batch.id)
            await self._publisher.publish(row, document)
