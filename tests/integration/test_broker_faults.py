"""The worker under broker faults, on librdkafka's 3-broker mock cluster
(``tests.harness.mock_cluster``).

Each scenario streams 200 requests at an in-process worker while a fault hits the cluster,
then checks the two promises of intake: no request is lost (every request id gets a reply)
and, once the worker has stopped, its group's committed offsets equal the end offsets (nothing
is left to redeliver). Committed offsets are read only after the worker has left, because the
mock cluster serves one consumer per group.

Scenarios: a partition leader's broker down for 4 s; partition leaders moved mid-run; injected
OffsetCommit errors (NOT_COORDINATOR, REQUEST_TIMED_OUT, REBALANCE_IN_PROGRESS); injected
Produce errors (NOT_LEADER_OR_FOLLOWER). Injected errors answer the next N requests of that API
to any client, so the test's own request producer may take some of the Produce errors too;
both producers retry.

What the mock showed (librdkafka 2.16.1, aiokafka 0.14.0):

- Broker down: connections refused and the broker left out of Metadata, so aiokafka logs
  ``NodeNotReadyError`` / ``StaleMetadata: Broker id 2 not in current metadata`` each retry
  until it is up; produce batches survive because the outage (4 s) is shorter than
  ``request_timeout_ms`` (10 s here), which is also aiokafka's delivery timeout.
- Leader move: producers get NOT_LEADER_OR_FOLLOWER once per partition, refresh metadata and
  resend.
- OffsetCommit NOT_COORDINATOR / REQUEST_TIMED_OUT: aiokafka marks the coordinator dead,
  finds it again and retries inside ``commit()``. REBALANCE_IN_PROGRESS: ``CommitFailedError``
  plus a rejoin (revoke → JoinGroup → reassign of the same partitions); the worker keeps
  serving and re-commits.
- The mock holds a rejoining member's JoinGroup ~5 s, and a new group waits 3 s before its
  first assignment unless ``set_group_initial_rebalance_delay_ms(0)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from client import build_request
from infra.dev.demo_models import add_fixed_latency_model
from infra.kafka import KafkaSettings
from schemas import MLInput, Tensor, Topics
from schemas.codec import encode
from tests.harness.admission import AdmissionFile
from tests.harness.mock_cluster import ApiKey, ErrorCode, MockCluster
from worker.app import Worker
from worker.settings import WorkerSettings

pytestmark = pytest.mark.kafka

MODEL = "fixed-5"
N_REQUESTS = 200
INFER_PARTITIONS = 4
REPLY_TIMEOUT_S = 25.0
# Pacing: 200 requests over ~5 s, so every fault lands while requests are flowing.
BATCH = 10
BATCH_INTERVAL_S = 0.25


def _kafka(mock: MockCluster) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=mock.bootstraps,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        request_timeout_ms=10_000,
    )


@dataclass
class Stack:
    mock: MockCluster
    topics: Topics
    settings: WorkerSettings
    request_ids: list[str] = field(default_factory=list)
    replied: set[str] = field(default_factory=set)

    @property
    def infer_topic(self) -> str:
        return self.topics.infer(MODEL)

    def missing(self) -> set[str]:
        return set(self.request_ids) - self.replied


@pytest.fixture
def mock() -> Iterator[MockCluster]:
    with MockCluster(brokers=3) as cluster:
        cluster.set_group_initial_rebalance_delay_ms(0)
        yield cluster


@pytest.fixture
def stack(mock: MockCluster, tmp_path: Path, admission: AdmissionFile) -> Stack:
    ns = "f" + uuid.uuid4().hex[:12]
    topics = Topics(ns)
    for name, partitions in [
        (topics.infer(MODEL), INFER_PARTITIONS),
        (topics.replies, 4),
        (topics.settlement, 4),
        (topics.dlq, 1),
    ]:
        mock.create_topic(name, partitions, replication_factor=3)
        # Deterministic leaders: partition p on broker p % 3 + 1 (broker 2 leads p1 of each).
        for p in range(partitions):
            mock.set_partition_leader(name, p, p % 3 + 1)
    hub = tmp_path / "hub"
    add_fixed_latency_model(hub, MODEL, 5)
    settings = WorkerSettings(
        namespace=ns,
        kafka=_kafka(mock),
        group_id=f"{ns}-workers",
        models=[MODEL],
        hub_dir=hub,
        cache_dir=tmp_path / "cache",
        key_dir=tmp_path / "keys",
        drain_timeout_s=10.0,
        admission=admission.settings(),
    )
    admission.admit_worker(settings)
    # The group coordinator stays on broker 1, so "broker 2 down" hits partition leaders only.
    mock.set_group_coordinator(settings.group_id, 1)
    return Stack(mock, topics, settings)


@contextlib.asynccontextmanager
async def running_worker(settings: WorkerSettings) -> AsyncIterator[Worker]:
    worker = Worker(settings)
    await worker.setup()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await worker.close()


@contextlib.asynccontextmanager
async def reply_reader(stack: Stack) -> AsyncIterator[None]:
    """Collects the request ids of every reply on the reply topic, from the beginning."""
    consumer = AIOKafkaConsumer(**stack.settings.kafka.consumer_kwargs(None))
    await consumer.start()

    async def read() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                stack.replied.update(r.key.decode() for r in records)

    try:
        tps = [TopicPartition(stack.topics.replies, p) for p in range(4)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        task = asyncio.create_task(read())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await consumer.stop()


async def produce_requests(stack: Stack) -> None:
    """N_REQUESTS requests, BATCH every BATCH_INTERVAL_S; returns once all are acknowledged."""
    producer = AIOKafkaProducer(**stack.settings.kafka.producer_kwargs())
    await producer.start()
    try:
        acks = []
        for i in range(N_REQUESTS):
            row = [i / 10, -i / 20, 1.0, float(i % 7)]
            request = build_request(
                MODEL,
                MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=row)}),
                reply_to=stack.topics.replies,
            )
            stack.request_ids.append(request.request_id)
            acks.append(
                await producer.send(
                    stack.infer_topic, encode(request), key=request.request_id.encode()
                )
            )
            if (i + 1) % BATCH == 0:
                await asyncio.sleep(BATCH_INTERVAL_S)
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def wait_for_replies(stack: Stack, n_at_least: int, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(stack.replied & set(stack.request_ids)) < n_at_least:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"{len(stack.replied)} replies, wanted {n_at_least}, within {timeout_s} s"
            )
        await asyncio.sleep(0.05)


async def committed_and_end_offsets(
    stack: Stack,
) -> tuple[dict[int, int | None], dict[int, int]]:
    consumer = AIOKafkaConsumer(**stack.settings.kafka.consumer_kwargs(stack.settings.group_id))
    await consumer.start()
    try:
        tps = [TopicPartition(stack.infer_topic, p) for p in range(INFER_PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        committed = {tp.partition: await consumer.committed(tp) for tp in tps}
        return committed, {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


Fault = Callable[[Stack], Awaitable[None]]


async def run_scenario(stack: Stack, fault: Fault) -> None:
    async with reply_reader(stack), running_worker(stack.settings):
        producing = asyncio.create_task(produce_requests(stack))
        try:
            await fault(stack)
            await asyncio.wait_for(producing, REPLY_TIMEOUT_S)
        finally:
            if not producing.done():
                producing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producing
        await wait_for_replies(stack, N_REQUESTS, REPLY_TIMEOUT_S)

    assert len(stack.request_ids) == N_REQUESTS
    assert not stack.missing(), f"{len(stack.missing())} requests got no reply"

    committed, ends = await committed_and_end_offsets(stack)
    assert sum(ends.values()) == N_REQUESTS
    assert committed == ends


# -- scenarios ---------------------------------------------------------------------------------
# Mock control calls block until the mock's thread answers, now and then for ~1 s (see
# tests.harness.mock_cluster), so while the worker shares this event loop they run in a thread.


async def test_partition_leader_broker_down_for_4_s(stack: Stack) -> None:
    async def fault(s: Stack) -> None:
        await wait_for_replies(s, 30, REPLY_TIMEOUT_S)
        await asyncio.to_thread(s.mock.broker_down, 2)  # leads p1 of every topic
        await asyncio.sleep(4)
        await asyncio.to_thread(s.mock.broker_up, 2)

    await run_scenario(stack, fault)


async def test_group_coordinator_broker_down_for_4_s(stack: Stack) -> None:
    """Broker 1 is the group coordinator and leads p0/p3: commits and heartbeats stall too."""

    async def fault(s: Stack) -> None:
        await wait_for_replies(s, 30, REPLY_TIMEOUT_S)
        await asyncio.to_thread(s.mock.broker_down, 1)
        await asyncio.sleep(4)
        await asyncio.to_thread(s.mock.broker_up, 1)

    await run_scenario(stack, fault)


async def test_partition_leaders_move_mid_run(stack: Stack) -> None:
    def move_all(s: Stack) -> None:
        for name, partitions in [
            (s.infer_topic, INFER_PARTITIONS),
            (s.topics.replies, 4),
            (s.topics.settlement, 4),
        ]:
            for p in range(partitions):
                s.mock.set_partition_leader(name, p, (p + 1) % 3 + 1)

    async def fault(s: Stack) -> None:
        await wait_for_replies(s, 30, REPLY_TIMEOUT_S)
        await asyncio.to_thread(move_all, s)
        await wait_for_replies(s, 100, REPLY_TIMEOUT_S)
        await asyncio.to_thread(s.mock.set_partition_leader, s.infer_topic, 0, 2)

    await run_scenario(stack, fault)


async def test_commit_errors_are_retried_until_everything_is_committed(stack: Stack) -> None:
    """NOT_COORDINATOR and REQUEST_TIMED_OUT are retried inside aiokafka's commit;
    REBALANCE_IN_PROGRESS fails the commit (CommitFailedError) and makes the consumer rejoin,
    so intake's revoke → reassign path runs mid-stream too."""

    async def fault(s: Stack) -> None:
        for after, errors in [
            (20, [ErrorCode.NOT_COORDINATOR, ErrorCode.REQUEST_TIMED_OUT]),
            (60, [ErrorCode.REBALANCE_IN_PROGRESS]),
            (100, [ErrorCode.NOT_COORDINATOR] * 3),
            (140, [ErrorCode.REQUEST_TIMED_OUT, ErrorCode.REBALANCE_IN_PROGRESS]),
        ]:
            await wait_for_replies(s, after, REPLY_TIMEOUT_S)
            await asyncio.to_thread(s.mock.push_request_errors, ApiKey.OFFSET_COMMIT, errors)

    await run_scenario(stack, fault)


async def test_produce_errors_are_retried(stack: Stack) -> None:
    async def fault(s: Stack) -> None:
        for after in (20, 80, 140):
            await wait_for_replies(s, after, REPLY_TIMEOUT_S)
            await asyncio.to_thread(
                s.mock.push_request_errors,
                ApiKey.PRODUCE,
                [ErrorCode.NOT_LEADER_OR_FOLLOWER] * 3,
            )

    await run_scenario(stack, fault)


async def test_commit_rejected_at_shutdown_is_still_committed(stack: Stack) -> None:
    """The final commit of ``Intake.run`` is answered REBALANCE_IN_PROGRESS.

    With a 60 s commit interval that final commit carries every offset. Intake itself does not
    retry it (``Intake._commit`` logs and returns); what saves it is aiokafka: the failed
    commit makes the consumer rejoin before ``close()`` stops it, the rejoin calls
    ``on_partitions_revoked``, and intake's revoke commit (old generation, accepted) lands.
    The rejoin holds ``close()`` ~5 s (the mock answers that JoinGroup late).
    """
    stack.settings = stack.settings.model_copy(update={"commit_interval_ms": 60_000})
    async with reply_reader(stack):
        async with running_worker(stack.settings):
            await produce_requests(stack)
            await wait_for_replies(stack, N_REQUESTS, REPLY_TIMEOUT_S)
            await asyncio.to_thread(
                stack.mock.push_request_errors,
                ApiKey.OFFSET_COMMIT,
                [ErrorCode.REBALANCE_IN_PROGRESS],
            )
    assert not stack.missing()
    committed, ends = await committed_and_end_offsets(stack)
    assert committed == ends
