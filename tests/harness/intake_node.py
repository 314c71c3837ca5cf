"""One worker's intake, wired as the worker wires it (``worker.app.compose_intake``), on any
``Kafka`` port, with an audit of its commits.

``IntakeNode`` owns a producer, a group consumer and the intake task: ``start`` subscribes and
runs, ``stop`` stops as the worker does (stop fetching, drain, commit, leave the group), and
``crash`` makes the consumer vanish first (no commit, no revocation) and abandons what is in
flight. ``CommitAudit`` checks, at every commit, that each offset below the committed one was
answered first: its reply acknowledged by the cluster.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence

from nacl.public import PrivateKey

from infra.kafka.ports import Kafka, Record, TopicPartition
from schemas.topics import Topics
from tests.harness.engines import GatedEngine
from tests.harness.kafka_audit import AuditedConsumer, AuditedProducer, request_id_of
from tests.harness.kafka_env import KafkaEnv
from tests.harness.nodes import TestNode
from worker.app import compose_intake
from worker.intake import Intake, IntakeConfig
from worker.pipeline import Pipeline

__all__ = ["CommitAudit", "IntakeNode"]


class CommitAudit:
    """What one intake fetched, published and committed, and every commit that went past an
    unanswered offset (``violations``; it must stay empty)."""

    def __init__(self, topics: Topics) -> None:
        self._topics = topics
        self.fetched: dict[TopicPartition, dict[int, str | None]] = defaultdict(dict)
        self.replied: set[str] = set()
        self.settled: list[str] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.violations: list[str] = []

    def on_fetch(self, batches: Mapping[TopicPartition, Sequence[Record]]) -> None:
        for tp, records in batches.items():
            for record in records:
                self.fetched[tp][record.offset] = request_id_of(record.value)

    def on_ack(self, topic: str, _key: bytes | None, value: bytes | None) -> None:
        rid = request_id_of(value)
        if rid is None:
            return
        if topic == self._topics.settlement:
            self.settled.append(rid)
        elif topic != self._topics.dlq:
            self.replied.add(rid)

    def on_commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))
        for tp, committed in offsets.items():
            for offset, rid in self.fetched[tp].items():
                if offset < committed and (rid is None or rid not in self.replied):
                    self.violations.append(f"{tp} committed {committed} before offset {offset}")

    def committed_sequence(self, tp: TopicPartition) -> list[int]:
        return [c[tp] for c in self.commits if tp in c]


class IntakeNode:
    """A worker node reduced to its intake: one ``GatedEngine`` per model, one signer."""

    def __init__(
        self,
        env: KafkaEnv,
        topics: Topics,
        engine: GatedEngine,
        *,
        group: str,
        config: IntakeConfig,
        seed: int,
    ) -> None:
        self.env = env
        self.kafka: Kafka = env.kafka
        self.topics = topics
        self.engine = engine
        self.group = group
        self.config = config
        self.keys = TestNode.seeded(seed)
        """Admitted or not as the test decides (``TestNode.seeded(seed)`` names it ahead)."""
        self.audit = CommitAudit(topics)
        self.consumer = AuditedConsumer(
            self.kafka.consumer(group),
            on_fetch=self.audit.on_fetch,
            on_commit=self.audit.on_commit,
        )
        self.producer = AuditedProducer(self.kafka.producer(), self.audit.on_ack)
        self.intake: Intake | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def node_id(self) -> str:
        return self.keys.node_id

    async def start(self) -> IntakeNode:
        await self.producer.start()
        pipeline = Pipeline(
            {self.engine.model_name: self.engine},
            self.keys.signer,
            self.keys.chain,
            retries=0,
        )
        self.intake = compose_intake(
            self.consumer,
            self.producer,
            pipeline,
            self.topics,
            self.config,
            dlq_key=PrivateKey.generate().public_key,
        )
        self.consumer.subscribe(
            [self.topics.infer(self.engine.model_name)], self.intake.rebalance_listener()
        )
        await self.consumer.start()
        self._task = asyncio.create_task(self.intake.run())
        return self

    async def stop(self) -> None:
        """Stop as the worker stops: fetching ends, in-flight work drains and is committed,
        then the consumer leaves the group and the producer flushes."""
        if self.intake is not None and self._task is not None:
            self.intake.stop()
            async with asyncio.timeout(self.config.drain_timeout_s + 10):
                await self._task
            self._task = None
        await self.consumer.stop()
        await self.producer.stop()

    async def crash(self) -> None:
        """Vanish: the consumer goes first (no commit, no revocation), then the intake is
        stopped with its drain failing to commit anything more."""
        await self.env.crash(self.consumer.inner)
        self.consumer.fail_commits(1_000_000)
        await self.stop()

    async def close(self) -> None:
        """Clean-up for a test that failed half-way (idempotent)."""
        if self._task is not None:
            self.engine.release_all()
            await self.stop()
