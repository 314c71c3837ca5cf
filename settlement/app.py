"""Composition root of the settlement service: consume → verify → ledger → commit, and
(when anchoring is on) ledger → Merkle batch → chain.

Offsets are committed only after the ledger transaction holding a batch has committed, and the
ledger's unique key makes a redelivered record a no-op, so a crash at any point neither loses
nor double-counts a record. Anchoring runs beside consumption and never slows it: see
``settlement.batcher`` for its own crash-safety argument.

The settlement topic carries two message types, told apart by their ``type``:
``settlement_record`` (a signed result, ``schemas.verify.record``) and ``proof_record`` (a ZKML
proof that follows a result, ``settlement.proofs``). Both of a batch go into one ledger
transaction, records first, so a proof and its result arriving together link up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from infra.health import HealthServer, kafka_reachable
from infra.kafka.client import ClusterKafka
from infra.kafka.ports import Consumer, Kafka, Producer, Record, TopicPartition
from infra.lifecycle import Supervisor, clear_ready, install_stop_handlers, mark_ready
from infra.tracing import trace_fields
from schemas.base import VerificationMode
from schemas.codec import too_deep
from schemas.limits import MAX_MESSAGE_BYTES
from schemas.merkle import envelope_leaf
from schemas.verify.record import Rejected, Verified, gate_record, verify_record
from settlement.batcher import Batcher, BatcherConfig
from settlement.chain import SettlementChain
from settlement.failpoints import failpoint
from settlement.ledger import Accepted, Ledger, Origin, ProofEntry, Rejection, open_ledger
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
from settlement.publisher import BatchPublisher, BatchSink, DirectorySink, TopicSink
from settlement.settings import SettlementSettings

__all__ = ["SettlementFatal", "SettlementService", "serve"]

log = logging.getLogger(__name__)

_LAG_INTERVAL_S = 5.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SettlementFatal(Exception):
    """Settlement cannot go on safely (its registry view may be stale, a background task
    died): nothing more is committed, and the process exits non-zero for a restart."""


class SettlementService:
    def __init__(self, settings: SettlementSettings, kafka: Kafka | None = None) -> None:
        self.settings = settings
        self.kafka: Kafka = kafka if kafka is not None else ClusterKafka(settings.kafka)
        self.ledger: Ledger | None = None
        self.chain: SettlementChain | None = None
        self.batcher: Batcher | None = None
        self.publisher: BatchPublisher | None = None
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._stopping = asyncio.Event()
        zk = settings.zk
        self.vk_store = VkStore(zk.vk_store_dir) if zk.vk_store_dir is not None else None
        self.nodes: NodeRegistry | None = None
        self.metrics = SettlementMetrics()
        self.health: HealthServer | None = None
        self.supervisor = Supervisor(on_failure=lambda _name: self.stop())
        self.fatal: BaseException | None = None

    @property
    def ready(self) -> bool:
        """Consuming, with a live registry view and every background task alive."""
        return (
            self._consumer is not None
            and not self._stopping.is_set()
            and self.supervisor.healthy
            and (self.nodes is None or self.nodes.healthy)
        )

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
                    "registry_view": lambda: self.nodes is None or self.nodes.healthy,
                    "consuming": lambda: self.ready,
                },
            )
            await self.health.start()
        self.ledger = await asyncio.to_thread(open_ledger, s.ledger_url)
        self.nodes = NodeRegistry(self.kafka, s.topics.registry, s.registry, s.admission)
        await self.nodes.start(self.supervisor)
        if s.anchor:
            self.chain = await SettlementChain.connect(s.chain)
            self._producer = self.kafka.producer()
            await self._producer.start()
            sinks: list[BatchSink] = [TopicSink(self._producer, s.topics.batches)]
            if s.publish_dir is not None:
                sinks.append(DirectorySink(s.publish_dir))
            self.publisher = BatchPublisher(self.ledger, sinks)
            self.batcher = Batcher(
                self.ledger,
                self.chain,
                BatcherConfig(
                    max_records=s.merkle_batch_max_records, max_age_s=s.merkle_batch_max_age_s
                ),
                metrics=self.metrics,
                publisher=self.publisher,
            )
        self._consumer = self.kafka.consumer(s.group_id)
        self._consumer.subscribe([s.topics.settlement])
        await self._consumer.start()
        log.info("settlement ready")

    def stop(self) -> None:
        self._stopping.set()
        self.supervisor.shutting_down()
        if self.batcher is not None:
            self.batcher.stop()

    async def run(self) -> None:
        assert self._consumer is not None and self.ledger is not None, "setup() first"
        if self.batcher is not None:
            self.supervisor.spawn("anchoring", self.batcher.run(), may_return=True)
        self.supervisor.spawn("consumer-lag", self._sample_lag())
        try:
            await self._consume()
        finally:
            self.supervisor.shutting_down()
            if self.batcher is not None:
                self.batcher.stop()
            await self.supervisor.stop(timeout_s=30.0)
        if self.fatal is not None:
            raise SettlementFatal(str(self.fatal)) from self.fatal
        if self.supervisor.failures:
            raise SettlementFatal(f"a background task died: {sorted(self.supervisor.failures)}")

    async def _consume(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=200, max_records=self.settings.max_batch
            )
            if batches:
                await self._settle(batches)

    async def _settle(self, batches: Mapping[TopicPartition, Sequence[Record]]) -> None:
        assert self._consumer is not None and self.ledger is not None
        now_ms = _now_ms()
        rules = self.settings.record_rules()
        accepted: list[Accepted] = []
        rejected: list[Rejection] = []
        proof_messages: list[tuple[Record, Origin]] = []
        verified: list[tuple[Verified, Record, Origin]] = []
        offsets = {}
        for tp, records in batches.items():
            for msg in records:
                origin = Origin(tp.topic, tp.partition, msg.offset)
                if _is_proof_record(msg.value):
                    proof_messages.append((msg, origin))
                    continue
                outcome = verify_record(msg.value, received_unix_ms=now_ms, rules=rules)
                if isinstance(outcome, Rejected):
                    self._reject(outcome, msg, origin, rejected)
                else:
                    verified.append((outcome, msg, origin))
            offsets[tp] = records[-1].offset + 1
        await self._await_nodes({v.record.envelope.node_id for v, _, _ in verified})
        for item, msg, origin in verified:
            gated = gate_record(item, self.nodes, now_ms) if self.nodes is not None else None
            if gated is not None:
                self._reject(gated, msg, origin, rejected)
            else:
                leaf = "0x" + envelope_leaf(item.record.envelope, item.digest).hex()
                accepted.append(Accepted(item.record, origin, leaf))
        proofs = await self._verify_proofs(proof_messages, rejected)
        if self.nodes is not None and not self.nodes.healthy:
            # Rejections made on a registry view that stopped updating may be wrong: commit
            # nothing, stop, and let a restart judge these records again on a fresh view.
            self.fatal = RuntimeError("the registry reader stopped")
            self.stop()
            return
        failpoint("before_ledger_write")
        started_s = time.perf_counter()
        stored = await asyncio.to_thread(self.ledger.store, accepted, rejected, proofs)
        inserted = stored.inserted
        self.metrics.settled(
            verified=len(accepted),
            inserted=inserted,
            rejected_reasons=[r.outcome.reason for r in rejected] + list(stored.refused),
            write_s=time.perf_counter() - started_s,
            replays=stored.replays,
        )
        failpoint("after_ledger_write")
        await self._consumer.commit(offsets)
        log.info(
            "batch settled",
            extra={
                "new": inserted,
                "duplicates": len(accepted) - inserted - stored.replays,
                "rejected": len(rejected),
                "proofs": len(proof_messages),
            },
        )

    @staticmethod
    def _reject(outcome: Rejected, msg: Record, origin: Origin, out: list[Rejection]) -> None:
        out.append(Rejection(outcome, msg.value, origin))
        headers = [(k, v) for k, v in (msg.headers or ()) if v is not None]
        log.warning(
            "record rejected",
            extra={
                "reason": outcome.reason,
                "request_id": outcome.request_id,
                **trace_fields(headers),
            },
        )

    async def _await_nodes(self, node_ids: set[str]) -> None:
        if self.nodes is not None and node_ids:
            await self.nodes.await_nodes(node_ids)

    async def _sample_lag(self) -> None:
        assert self._consumer is not None
        while True:
            await asyncio.sleep(_LAG_INTERVAL_S)
            lags = await self._consumer.lag(sorted(self._consumer.assignment()))
            self.metrics.set_lag({(tp.topic, tp.partition): n for tp, n in lags.items()})

    async def _verify_proofs(
        self, messages: list[tuple[Record, Origin]], rejected: list[Rejection]
    ) -> list[ProofEntry]:
        """Check proof records (cheap checks here, SNARKs in one child process); rejections
        are appended to ``rejected``, signed ones also returned as ledger entries."""
        zk = self.settings.zk
        now_ms = _now_ms()
        entries: list[ProofEntry] = []
        checked: list[tuple[ProofChecked, Origin]] = []

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
                for msg, _ in messages
            ]

        outcomes = await asyncio.to_thread(check_all) if messages else []
        await self._await_nodes(
            {o.record.claims.node_id for o in outcomes if isinstance(o, ProofChecked)}
        )
        for (msg, origin), outcome in zip(messages, outcomes, strict=True):
            if isinstance(outcome, ProofChecked):
                claims = outcome.record.claims
                reason = (
                    self.nodes.check(
                        claims.node_id,
                        claims.model_id,
                        claims.model_digest,
                        VerificationMode.ZKML,
                        now_ms,
                    )
                    if self.nodes is not None
                    else None
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
        origin: Origin,
        rejected: list[Rejection],
        entries: list[ProofEntry],
    ) -> None:
        rejected.append(Rejection(outcome, raw, origin))
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
        if self._producer is not None:
            await self._producer.stop()
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
