"""Composition root of the settlement service: consume → verify → ledger → commit, and
(when anchoring is on) ledger → Merkle batch → chain.

Offsets are committed only after the ledger transaction holding a batch has committed, and the
ledger's unique key makes a redelivered record a no-op, so a crash at any point neither loses
nor double-counts a record. Anchoring runs beside consumption and never slows it: see
``settlement.batcher`` for its own crash-safety argument.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

from infra.lifecycle import clear_ready, install_stop_handlers, mark_ready
from schemas.settlement import SettlementRecord
from settlement.batcher import Batcher, BatcherConfig
from settlement.chain import SettlementChain
from settlement.failpoints import failpoint
from settlement.ledger import Ledger, open_ledger
from settlement.settings import SettlementSettings
from settlement.verify import Rejected, verify_record

__all__ = ["SettlementService", "serve"]

log = logging.getLogger(__name__)


class SettlementService:
    def __init__(self, settings: SettlementSettings) -> None:
        self.settings = settings
        self.ledger: Ledger | None = None
        self.chain: SettlementChain | None = None
        self.batcher: Batcher | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self.seen = 0
        self.stored = 0
        self.rejected = 0

    async def setup(self) -> None:
        s = self.settings
        self.ledger = await asyncio.to_thread(open_ledger, s.ledger_url)
        if s.anchor:
            self.chain = await SettlementChain.connect(s.chain)
            self.batcher = Batcher(
                self.ledger,
                self.chain,
                BatcherConfig(
                    max_records=s.merkle_batch_max_records, max_age_s=s.merkle_batch_max_age_s
                ),
            )
        self._consumer = AIOKafkaConsumer(
            s.topics.settlement, **s.kafka.consumer_kwargs(s.group_id)
        )
        await self._consumer.start()
        log.info("settlement ready")

    def stop(self) -> None:
        self._stopping.set()
        if self.batcher is not None:
            self.batcher.stop()

    async def run(self) -> None:
        assert self._consumer is not None and self.ledger is not None, "setup() first"
        anchoring = asyncio.create_task(self.batcher.run()) if self.batcher else None
        try:
            await self._consume()
        finally:
            if anchoring is not None:
                self.batcher.stop()  # type: ignore[union-attr]
                await anchoring

    async def _consume(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=200, max_records=self.settings.max_batch
            )
            if batches:
                await self._settle(batches)

    async def _settle(self, batches: dict[TopicPartition, list[Any]]) -> None:
        assert self._consumer is not None and self.ledger is not None
        accepted: list[SettlementRecord] = []
        origins: list[str] = []
        rejected: list[tuple[Rejected, bytes | None, str, int, int]] = []
        offsets = {}
        for tp, records in batches.items():
            for msg in records:
                outcome = verify_record(msg.value, max_clock_skew_s=self.settings.max_clock_skew_s)
                if isinstance(outcome, Rejected):
                    rejected.append((outcome, msg.value, tp.topic, tp.partition, msg.offset))
                    log.warning(
                        "record rejected",
                        extra={"reason": outcome.reason, "request_id": outcome.request_id},
                    )
                else:
                    accepted.append(outcome.record)
                    origins.append(f"{tp.topic}/{tp.partition}/{msg.offset}")
            offsets[tp] = records[-1].offset + 1
        failpoint("before_ledger_write")
        inserted = await asyncio.to_thread(self.ledger.store, accepted, rejected, origins)
        failpoint("after_ledger_write")
        await self._consumer.commit(offsets)
        self.seen += len(accepted) + len(rejected)
        self.stored += inserted
        self.rejected += len(rejected)
        log.info(
            "batch settled",
            extra={
                "new": inserted,
                "duplicates": len(accepted) - inserted,
                "rejected": len(rejected),
            },
        )

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self.chain is not None:
            await self.chain.close()
        if self.ledger is not None:
            self.ledger.close()


async def serve(settings: SettlementSettings, ready_file: Path | None = None) -> None:
    service = SettlementService(settings)
    install_stop_handlers(service.stop)
    try:
        await service.setup()
        await mark_ready(ready_file, "ready")
        await service.run()
    finally:
        await service.close()
        await clear_ready(ready_file)
