"""Composition root of the settlement service: consume → verify → ledger → commit, and
(when anchoring is on) ledger → Merkle batch → chain.

Offsets are committed only after the ledger transaction holding a batch has committed, and the
ledger's unique key makes a redelivered record a no-op, so a crash at any point neither loses
nor double-counts a record. Anchoring runs beside consumption and never slows it: see
``settlement.batcher`` for its own crash-safety argument.

The settlement topic carries two message types, told apart by their ``type``:
``settlement_record`` (a signed result, ``settlement.verify``) and ``proof_record`` (a ZKML
proof that follows a result, ``settlement.proofs``). Both of a batch go into one ledger
transaction, records first, so a proof and its result arriving together link up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

from infra.health import HealthServer, consumer_lag, kafka_reachable
from infra.lifecycle import clear_ready, install_stop_handlers, mark_ready
from schemas.base import VerificationMode
from schemas.codec import too_deep
from schemas.limits import MAX_MESSAGE_BYTES
from schemas.settlement import SettlementRecord
from settlement.batcher import Batcher, BatcherConfig
from settlement.chain import SettlementChain
from settlement.failpoints import failpoint
from settlement.ledger import Ledger, ProofEntry, RejectedInput, open_ledger
from settlement.metrics import SettlementMetrics
from settlement.nodes import NodeRegistry
from settlement.proofs import (
    ProofChecked,
    ProofRejected,
    VkStore,
    check_proof_record,
    snark_rejection,
    verify_snarks,
)
from settlement.settings import SettlementSettings
from settlement.verify import Rejected, verify_record
from worker.tracing import trace_fields

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
        zk = settings.zk
        self.vk_store = VkStore(zk.vk_store_dir) if zk.vk_store_dir is not None else None
        self.seen = 0
        self.stored = 0
        self.rejected = 0
        self.proofs_seen = 0
        self.nodes: NodeRegistry | None = None
        self.metrics = SettlementMetrics()
        self.health: HealthServer | None = None
        self._lag_task: asyncio.Task[None] | None = None

    async def setup(self) -> None:
        s = self.settings
        if s.metrics_port is not None:
            self.health = HealthServer(
                host=s.metrics_host,
                port=s.metrics_port,
                registry=self.metrics.registry,
                ready={
                    "ledger_open": lambda: self.ledger is not None,
                    "broker_reachable": kafka_reachable(s.kafka),
                    "consuming": lambda: self._consumer is not None and not self._stopping.is_set(),
                },
            )
            await self.health.start()
        self.ledger = await asyncio.to_thread(open_ledger, s.ledger_url)
        if s.registry.required:
            self.nodes = NodeRegistry(s.kafka, s.topics.registry, s.registry)
            await self.nodes.start()
        if s.anchor:
            self.chain = await SettlementChain.connect(s.chain)
            self.batcher = Batcher(
                self.ledger,
                self.chain,
                BatcherConfig(
                    max_records=s.merkle_batch_max_records, max_age_s=s.merkle_batch_max_age_s
                ),
                metrics=self.metrics,
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
        self._lag_task = asyncio.create_task(self._sample_lag())
        try:
            await self._consume()
        finally:
            self._lag_task.cancel()
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
        rejected: list[RejectedInput] = []
        proof_messages: list[tuple[Any, str, int]] = []
        verified: list[tuple[SettlementRecord, Any, TopicPartition]] = []
        offsets = {}
        for tp, records in batches.items():
            for msg in records:
                if _is_proof_record(msg.value):
                    proof_messages.append((msg, tp.topic, tp.partition))
                    continue
                outcome = verify_record(msg.value, max_clock_skew_s=self.settings.max_clock_skew_s)
                if isinstance(outcome, Rejected):
                    self._reject(outcome, msg, tp, rejected)
                else:
                    verified.append((outcome.record, msg, tp))
            offsets[tp] = records[-1].offset + 1
        await self._await_nodes({r.envelope.node_id for r, _, _ in verified})
        for record, msg, tp in verified:
            env = record.envelope
            reason = self._node_gate(env.node_id, env.signed_unix_ms, env.mode)
            if reason is not None:
                gated = Rejected(reason, "", env.request_id, env.node_id)
                self._reject(gated, msg, tp, rejected)
            else:
                accepted.append(record)
                origins.append(f"{tp.topic}/{tp.partition}/{msg.offset}")
        proofs = await self._verify_proofs(proof_messages, rejected)
        failpoint("before_ledger_write")
        started_s = time.perf_counter()
        inserted = await asyncio.to_thread(self.ledger.store, accepted, rejected, origins, proofs)
        self.metrics.settled(
            verified=len(accepted),
            inserted=inserted,
            rejected_reasons=[r[0].reason for r in rejected],
            write_s=time.perf_counter() - started_s,
        )
        failpoint("after_ledger_write")
        await self._consumer.commit(offsets)
        self.seen += sum(len(records) for records in batches.values())
        self.proofs_seen += len(proof_messages)
        self.stored += inserted
        self.rejected += len(rejected)
        log.info(
            "batch settled",
            extra={
                "new": inserted,
                "duplicates": len(accepted) - inserted,
                "rejected": len(rejected),
                "proofs": len(proof_messages),
            },
        )

    @staticmethod
    def _reject(
        outcome: Rejected, msg: Any, tp: TopicPartition, rejected: list[RejectedInput]
    ) -> None:
        rejected.append((outcome, msg.value, tp.topic, tp.partition, msg.offset))
        log.warning(
            "record rejected",
            extra={
                "reason": outcome.reason,
                "request_id": outcome.request_id,
                **trace_fields(msg.headers),
            },
        )

    async def _await_nodes(self, node_ids: set[str]) -> None:
        if self.nodes is not None and node_ids:
            await self.nodes.await_nodes(node_ids)

    def _node_gate(self, node_id: str, signed_unix_ms: int, mode: VerificationMode) -> str | None:
        """Why this node may not settle a record signed at ``signed_unix_ms`` (None: it may);
        no gate when registration is not required."""
        if self.nodes is None:
            return None
        return self.nodes.check_record(node_id, signed_unix_ms, mode)

    async def _sample_lag(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            if self._consumer is not None:
                lags = await consumer_lag(self._consumer)
                self.metrics.set_lag({(tp.topic, tp.partition): n for tp, n in lags.items()})

    async def _verify_proofs(
        self, messages: list[tuple[Any, str, int]], rejected: list[RejectedInput]
    ) -> list[ProofEntry]:
        """Check proof records (cheap checks here, SNARKs in one child process); rejections
        are appended to ``rejected``, signed ones also returned as ledger entries."""
        zk = self.settings.zk
        now_ms = time.time_ns() // 1_000_000
        entries: list[ProofEntry] = []
        checked: list[tuple[ProofChecked, str]] = []

        def check_all() -> list[ProofChecked | Rejected]:
            # In a thread: the first proof of a model hashes its pinned files (SRS: MBs).
            return [
                check_proof_record(
                    msg.value,
                    self.vk_store,
                    allow_dev_srs=zk.allow_dev_srs,
                    max_clock_skew_s=self.settings.max_clock_skew_s,
                    now_ms=now_ms,
                )
                for msg, _, _ in messages
            ]

        outcomes = await asyncio.to_thread(check_all) if messages else []
        await self._await_nodes(
            {o.record.claims.node_id for o in outcomes if isinstance(o, ProofChecked)}
        )
        for (msg, topic, partition), outcome in zip(messages, outcomes, strict=True):
            origin = f"{topic}/{partition}/{msg.offset}"
            if isinstance(outcome, ProofChecked):
                claims = outcome.record.claims
                reason = self._node_gate(
                    claims.node_id, claims.signed_unix_ms, VerificationMode.ZKML
                )
                if reason is not None:
                    gated = snark_rejection(outcome, reason)
                    self._reject_proof(gated, msg.value, origin, rejected, entries)
                    continue
                checked.append((outcome, origin))
            else:
                self._reject_proof(outcome, msg.value, origin, rejected, entries)
        if not checked:
            return entries
        verdicts = await verify_snarks([c for c, _ in checked], timeout_s=zk.verify_timeout_s)
        for i, (item, origin) in enumerate(checked):
            if verdicts is not None and verdicts[i]:
                entries.append(ProofEntry(item.record, "verified", None, origin))
                continue
            reason = "bad_proof" if verdicts is not None else "verifier_timeout"
            raw = item.record.model_dump_json().encode()
            self._reject_proof(snark_rejection(item, reason), raw, origin, rejected, entries)
        return entries

    @staticmethod
    def _reject_proof(
        outcome: Rejected,
        raw: bytes | None,
        origin: str,
        rejected: list[RejectedInput],
        entries: list[ProofEntry],
    ) -> None:
        topic, partition, offset = origin.rsplit("/", 2)
        rejected.append((outcome, raw, topic, int(partition), int(offset)))
        if isinstance(outcome, ProofRejected) and outcome.record is not None:
            entries.append(ProofEntry(outcome.record, "rejected", outcome.reason, origin))
        log.warning(
            "proof rejected", extra={"reason": outcome.reason, "request_id": outcome.request_id}
        )

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self.nodes is not None:
            await self.nodes.stop()
        if self.health is not None:
            await self.health.stop()
        if self.chain is not None:
            await self.chain.close()
        if self.ledger is not None:
            self.ledger.close()


def _is_proof_record(raw: bytes | None) -> bool:
    """True for a ``proof_record`` message. The substring test keeps the common case (a
    settlement record) to one scan; a record whose ids contain the word is parsed."""
    if raw is None or b"proof_record" not in raw:
        return False
    if len(raw) > MAX_MESSAGE_BYTES or too_deep(raw):
        return False  # not parsed here (deep JSON can overflow the C stack): decode rejects it
    try:
        message = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("type") == "proof_record"


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
