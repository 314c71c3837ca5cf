"""Broker faults on librdkafka's mock cluster (``tests.harness.mock_cluster``) while requests flow.

An in-process worker (the mock serves one consumer per group, see FIELD-NOTES) answers a paced
stream of requests on a 3-broker mock cluster while one kind of fault hits it. Each fault
kind gets a fresh cluster. Afterwards the worker is stopped and its committed offsets are
compared with the end offsets: anything left uncommitted would be answered again on restart.

Mock control calls are synchronous round trips to the mock's thread that sometimes take ~1 s,
so they run in a thread (``asyncio.to_thread``) while the worker shares this event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.chaos_support import MODEL, Row, produce_paced, requests_for
from infra.kafka import KafkaSettings
from schemas import Topics
from tests.harness.admission import AdmissionFile
from tests.harness.mock_cluster import ApiKey, ErrorCode, MockCluster
from tests.harness.outcomes import TopicTap, terminal_replies
from worker.app import Worker
from worker.settings import WorkerSettings

__all__ = ["FAULTS", "broker_fault"]

_PARTITIONS = 4
Fault = Callable[[MockCluster, Topics, Callable[[int], Awaitable[None]]], Awaitable[None]]


async def _down_up(
    mock: MockCluster, topics: Topics, after: Callable[[int], Awaitable[None]]
) -> None:
    """A partition leader's broker down 4 s, then the group coordinator's broker down 3 s."""
    await after(50)
    await asyncio.to_thread(mock.broker_down, 2)
    await asyncio.sleep(4)
    await asyncio.to_thread(mock.broker_up, 2)
    await after(150)
    await asyncio.to_thread(mock.broker_down, 1)
    await asyncio.sleep(3)
    await asyncio.to_thread(mock.broker_up, 1)


async def _leaders_move(
    mock: MockCluster, topics: Topics, after: Callable[[int], Awaitable[None]]
) -> None:
    """Every partition leader moves to the next broker, twice."""
    for shift, at in ((1, 50), (2, 150)):
        await after(at)

        def move(shift: int = shift) -> None:
            for name in (topics.infer(MODEL), topics.replies, topics.settlement):
                for p in range(_PARTITIONS):
                    mock.set_partition_leader(name, p, (p + shift) % 3 + 1)

        await asyncio.to_thread(move)


async def _request_errors(
    mock: MockCluster, topics: Topics, after: Callable[[int], Awaitable[None]]
) -> None:
    """Produce NOT_LEADER_OR_FOLLOWER; OffsetCommit NOT_COORDINATOR, REQUEST_TIMED_OUT and
    REBALANCE_IN_PROGRESS (the last one makes the consumer rejoin mid-stream); Fetch
    NOT_LEADER_OR_FOLLOWER."""
    steps = [
        (30, ApiKey.PRODUCE, [ErrorCode.NOT_LEADER_OR_FOLLOWER] * 3),
        (60, ApiKey.OFFSET_COMMIT, [ErrorCode.NOT_COORDINATOR, ErrorCode.REQUEST_TIMED_OUT]),
        (100, ApiKey.FETCH, [ErrorCode.NOT_LEADER_OR_FOLLOWER] * 2),
        (140, ApiKey.OFFSET_COMMIT, [ErrorCode.REBALANCE_IN_PROGRESS]),
        (220, ApiKey.PRODUCE, [ErrorCode.NOT_ENOUGH_REPLICAS] * 2),
    ]
    for at, api, errors in steps:
        await after(at)
        await asyncio.to_thread(mock.push_request_errors, api, errors)


FAULTS: dict[str, Fault] = {
    "broker down/up (leader, then coordinator)": _down_up,
    "partition leaders move (twice)": _leaders_move,
    "injected request errors (produce, fetch, commit)": _request_errors,
}


def _settings(mock: MockCluster, topics: Topics, hub: Path, state: Path) -> WorkerSettings:
    """A worker on the mock cluster that a pinned authority (next to its state) admits."""
    state.mkdir(parents=True, exist_ok=True)
    admission = AdmissionFile(state / "admission.json")
    admission.admit_worker(WorkerSettings(key_dir=state / "keys"))
    return WorkerSettings(
        admission=admission.settings(),
        namespace=topics.namespace,
        kafka=KafkaSettings(
            bootstrap_servers=mock.bootstraps,
            session_timeout_ms=6000,
            heartbeat_interval_ms=500,
            request_timeout_ms=10_000,
        ),
        group_id=f"{topics.namespace}-workers",
        models=[MODEL],
        hub_dir=hub,
        cache_dir=state / "cache",
        key_dir=state / "keys",
        drain_timeout_s=10.0,
    )


def _create_topics(mock: MockCluster, topics: Topics) -> None:
    for name, partitions in [
        (topics.infer(MODEL), _PARTITIONS),
        (topics.replies, _PARTITIONS),
        (topics.settlement, _PARTITIONS),
        (topics.dlq, 1),
        (topics.registry, 1),
    ]:
        mock.create_topic(name, partitions, replication_factor=3)
        for p in range(partitions):  # partition p led by broker p % 3 + 1
            mock.set_partition_leader(name, p, p % 3 + 1)


async def _uncommitted(settings: WorkerSettings, topic: str) -> int:
    consumer = AIOKafkaConsumer(**settings.kafka.consumer_kwargs(settings.group_id))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(_PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        committed = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
        return sum(ends[tp] - committed[tp] for tp in tps)
    finally:
        await consumer.stop()


async def broker_fault(
    name: str, hub: Path, work: Path, *, requests: int, rate_per_s: float
) -> Row:
    """Run fault ``name`` (a key of ``FAULTS``) against a fresh mock cluster."""
    started = time.monotonic()
    topics = Topics("cm" + uuid.uuid4().hex[:8])
    with MockCluster(brokers=3) as mock:
        mock.set_group_initial_rebalance_delay_ms(0)
        _create_topics(mock, topics)
        settings = _settings(mock, topics, hub, work / topics.namespace)
        mock.set_group_coordinator(settings.group_id, 1)
        batch = requests_for(topics, requests)
        ids = {r.request_id for r in batch}
        crashes: list[str] = []
        worker = Worker(settings)
        await worker.setup()
        running = asyncio.create_task(worker.run())
        async with TopicTap(settings.kafka, topics.replies, _PARTITIONS) as tap:

            async def after(n: int) -> None:
                while len(terminal_replies(tap.messages).keys() & ids) < n:
                    if running.done():
                        return
                    await asyncio.sleep(0.05)

            producing = asyncio.create_task(
                produce_paced(settings.kafka, topics, batch, rate_per_s)
            )
            try:
                await asyncio.wait_for(FAULTS[name](mock, topics, after), 60)
                await asyncio.wait_for(producing, 60)
                await asyncio.wait_for(after(requests), 60)
                await asyncio.sleep(1.0)
            except TimeoutError:
                pass  # counted below as lost
            finally:
                if not producing.done():
                    producing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await producing
                worker.stop()
                try:
                    await asyncio.wait_for(running, 30)
                except Exception as e:  # the worker stopped on a failure: a crash
                    crashes.append(type(e).__name__)
                await worker.close()
            replies = terminal_replies(tap.messages)
        uncommitted = await _uncommitted(settings, topics.infer(MODEL))
    answered = ids & replies.keys()
    return Row(
        f"mock cluster: {name}",
        sent=requests,
        answered=len(answered),
        lost=len(ids - answered),
        duplicates=sum(1 for rid in answered if len(replies[rid]) > 1),
        crashes=len(crashes),
        notes={
            "uncommitted_after_stop": uncommitted,
            "crash_details": crashes,
            "wall_s": round(time.monotonic() - started, 1),
        },
    )
