"""Shutdown always completes: ``Intake.run()`` returns within its bound (``drain_timeout_s +
max(1, drain_timeout_s / 4) + commit_timeout_s``, ``worker.intake``) whatever await it is in
when ``stop()`` is called or its task is cancelled, and it makes its final commit.

The consumer (``tests.harness.stuck_consumer.StuckConsumer`` around the in-memory one) is made
to hang for ever in, or raise from, ``getmany`` (the fetch loop), ``commit`` (the commit loop)
or ``lag`` (the metrics sampler) once every request is answered; the intake is ended while it
is inside that call. Requests are answered by a scripted engine (or held for ever by a gated
one, for the drain). Commits are left to the final commit unless the scenario is about
commits, so "the final commit ran" means the committed offsets reached the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from nacl.public import PrivateKey

from infra.kafka.memory import MemoryKafka
from infra.kafka.ports import Producer, TopicPartition, UnknownTopic
from schemas.signing import ChainSigner, Signer
from schemas.topics import Topics
from tests.harness.engines import GatedEngine
from tests.harness.hostile import ml_payload, request_doc
from tests.harness.hostile_node import node_context
from tests.harness.stuck_consumer import How, Method, StuckConsumer
from worker.app import compose_intake
from worker.intake import Intake, IntakeConfig
from worker.metrics import WorkerMetrics
from worker.pipeline import Pipeline

MODEL = "echo"
REQUESTS = 6
DRAIN_S = 0.5
COMMIT_TIMEOUT_S = 0.5
BOUND_S = DRAIN_S + max(1.0, DRAIN_S / 4) + COMMIT_TIMEOUT_S
End = Literal["stop", "cancel"]
SEED = b"\x0e" * 32


@dataclass
class Node:
    kafka: MemoryKafka
    consumer: StuckConsumer
    intake: Intake
    task: asyncio.Task[None]
    engine: GatedEngine
    ends: dict[TopicPartition, int]

    @property
    def answered(self) -> int:
        try:
            records = self.kafka.records(TOPICS.replies)
        except UnknownTopic:  # no reply yet
            return 0
        return sum(1 for r in records if json.loads(r.value or b"").get("type") == "result")

    def committed(self) -> dict[TopicPartition, int]:
        return {
            tp: offset
            for tp, offset in self.kafka.committed_offsets(GROUP).items()
            if tp.topic == TOPICS.infer(MODEL)
        }

    async def end(self, how: End) -> float:
        """End the intake as asked; seconds until ``run()`` finished."""
        started = time.monotonic()
        if how == "stop":
            self.intake.stop()
        else:
            self.task.cancel()
        async with asyncio.timeout(BOUND_S + 10):  # far past the bound: a hang fails here
            await asyncio.wait({self.task})
        return time.monotonic() - started


TOPICS = Topics("sd")
GROUP = "sd-workers"
Start = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """``start(commit_interval_s=3600, held=False)``: an intake with ``REQUESTS`` requests on
    two partitions (by default only the final commit commits; ``held``: every request hangs
    in the engine)."""
    started: list[tuple[Node, Producer]] = []

    async def go(*, commit_interval_s: float = 3600.0, held: bool = False) -> Node:
        kafka = MemoryKafka()
        kafka.create_topic(TOPICS.infer(MODEL), 2)
        ctx = node_context(TOPICS)
        producer = kafka.producer()
        await producer.start()
        ends: dict[TopicPartition, int] = {}
        for i in range(REQUESTS):
            doc = request_doc(ctx, f"sd-{i}", MODEL, ml_payload())
            ack = await producer.send(TOPICS.infer(MODEL), json.dumps(doc).encode(), key=b"%d" % i)
            record: Any = await ack
            ends[TopicPartition(record.topic, record.partition)] = record.offset + 1
        engine = GatedEngine(MODEL)
        if held:
            engine.hold_all()
        consumer = StuckConsumer(kafka.consumer(GROUP))
        intake = compose_intake(
            consumer,
            producer,
            Pipeline({MODEL: engine}, Signer(SEED), ChainSigner(SEED), retries=0),
            TOPICS,
            IntakeConfig(
                commit_interval_s=commit_interval_s,
                drain_timeout_s=DRAIN_S,
                commit_timeout_s=COMMIT_TIMEOUT_S,
                metrics_interval_s=0.01,
            ),
            dlq_key=PrivateKey.generate().public_key,
            metrics=WorkerMetrics(process_metrics=False),
        )
        consumer.subscribe([TOPICS.infer(MODEL)], intake.rebalance_listener())
        await consumer.start()
        node = Node(kafka, consumer, intake, asyncio.create_task(intake.run()), engine, ends)
        started.append((node, producer))
        return node

    try:
        yield go
    finally:
        for node, producer in started:
            node.engine.release_all()
            if not node.task.done():
                node.intake.stop()
                await asyncio.wait({node.task}, timeout=BOUND_S + 5)
            await node.consumer.stop()
            await producer.stop()


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("end", ["stop", "cancel"])
@pytest.mark.parametrize(
    ("method", "how"),
    [("getmany", "block"), ("getmany", "raise"), ("lag", "block"), ("lag", "raise")],
)
async def test_ended_inside_a_fetch_or_a_lag_sample_run_returns_and_commits_to_the_end(
    start: Start, method: Method, how: How, end: End
) -> None:
    node = await start()
    await _until(lambda: node.answered == REQUESTS)
    node.consumer.stick(method, how)
    async with asyncio.timeout(5):
        await node.consumer.entered[method].wait()
    await asyncio.sleep(0.02)  # inside the call (block), or in the backoff after it (raise)
    assert not node.task.done()
    assert node.committed() == {}  # nothing committed yet: only the final commit will

    elapsed_s = await node.end(end)

    assert elapsed_s < BOUND_S, elapsed_s
    assert node.committed() == node.ends  # the final commit ran
    assert node.intake.fatal is None
    assert node.task.cancelled() == (end == "cancel")


@pytest.mark.parametrize("end", ["stop", "cancel"])
@pytest.mark.parametrize("how", ["block", "raise"])
async def test_ended_while_commits_hang_or_fail_run_returns_within_the_bound(
    start: Start, how: How, end: End
) -> None:
    node = await start(commit_interval_s=0.01)
    node.consumer.stick("commit", how)
    await _until(lambda: node.answered == REQUESTS)
    async with asyncio.timeout(5):
        await node.consumer.entered["commit"].wait()
    await asyncio.sleep(0.02)
    calls_before = node.consumer.calls["commit"]

    elapsed_s = await node.end(end)

    assert elapsed_s < BOUND_S, elapsed_s
    assert node.consumer.calls["commit"] > calls_before  # the final commit was attempted
    assert node.committed() == {}
    assert node.intake.fatal is None  # a commit that fails is retried, never fatal


@pytest.mark.parametrize("end", ["stop", "cancel"])
async def test_ended_while_requests_hang_in_the_engine_run_returns_after_the_drain(
    start: Start, end: End
) -> None:
    node = await start(held=True)
    await _until(lambda: node.engine.running == REQUESTS)

    elapsed_s = await node.end(end)

    assert DRAIN_S <= elapsed_s < BOUND_S, elapsed_s
    assert node.engine.running == 0  # abandoned (cancelled), not left running
    assert node.committed() == {}  # nothing was answered
    assert node.answered == 0


async def test_a_fetch_that_fails_with_an_error_no_port_promises_stops_the_intake_cleanly(
    start: Start,
) -> None:
    node = await start()
    await _until(lambda: node.answered == REQUESTS)
    node.consumer.stick("getmany", "bug")
    async with asyncio.timeout(BOUND_S + 3):
        await asyncio.wait({node.task})
    assert node.task.exception() is None  # returned; the worker raises WorkerFatal on it
    assert isinstance(node.intake.fatal, RuntimeError)
    assert node.committed() == node.ends  # and it made its final commit
