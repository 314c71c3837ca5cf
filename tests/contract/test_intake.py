"""The worker intake's contract: one scenario class, run in memory and on Tansu.

Each scenario wires the intake exactly as the worker does (``worker.app.compose_intake``, see
``tests.harness.intake_node``) on the ``kafka`` environment (``tests/contract/conftest.py``):
``MemoryKafka`` in milliseconds, or the session's Tansu broker (``kafka`` marker). Engines are
``tests.harness.engines.GatedEngine`` (1 ms, held on demand), so what is checked is the intake:
one answer per request, commits that never pass an unanswered offset (``CommitAudit`` checks
every commit), the window, rebalances, drain on stop, duplicates and crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from client import build_request, verify_result
from infra.kafka.ports import Record, TopicPartition
from schemas import ErrorReply, InferenceRequest, InferenceResult, MLInput, Reply, Tensor, encode
from schemas.settlement import SettlementRecord
from schemas.signing import verify_envelope_signature
from schemas.topics import Topics
from tests.harness.admission import trust_in
from tests.harness.engines import DIGEST as GATED_DIGEST
from tests.harness.engines import GatedEngine
from tests.harness.intake_node import IntakeNode
from tests.harness.kafka_env import KafkaEnv, end_offsets
from tests.harness.nodes import TestNode
from tests.harness.settlement_service import SettlementRun
from tests.harness.support import settlement_counts
from worker.intake import IntakeConfig

MODEL = "echo"
_REPLY: TypeAdapter[InferenceResult | ErrorReply] = TypeAdapter(Reply)

Spawn = Callable[..., Awaitable[IntakeNode]]


def make_requests(n: int) -> list[InferenceRequest]:
    return [
        build_request(
            MODEL,
            MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 2], data=[i / 8, 1.0])}),
        )
        for i in range(n)
    ]


async def produce(kafka: KafkaEnv, topics: Topics, requests: Sequence[InferenceRequest]) -> None:
    """Produce as the client does (keyed by request id), in order, acknowledged."""
    async with kafka.producer() as producer:
        acks = [
            await producer.send(topics.infer(MODEL), encode(r), key=r.request_id.encode())
            for r in requests
        ]
        await asyncio.gather(*acks)


async def replies(kafka: KafkaEnv, topics: Topics, at_least: int) -> list[InferenceResult]:
    results = []
    for record in await kafka.read(topics.replies, at_least=at_least):
        reply = _REPLY.validate_json(record.value or b"")
        assert isinstance(reply, InferenceResult), reply
        assert record.key == reply.request_id.encode()
        results.append(reply)
    return results


async def settlement_records(
    kafka: KafkaEnv, topics: Topics, at_least: int
) -> list[SettlementRecord]:
    records = await kafka.read(topics.settlement, at_least=at_least)
    return [SettlementRecord.model_validate_json(r.value or b"") for r in records]


async def committed_to_end(
    kafka: KafkaEnv, group: str, topics: Topics, ends: dict[int, int | None]
) -> None:
    async def done() -> bool:
        return await kafka.committed(group, topics.infer(MODEL)) == ends

    await kafka.wait_until(done, what=f"commits reaching the ends {ends}")


def assert_verified(
    answers: Sequence[InferenceResult],
    by_id: dict[str, InferenceRequest],
    nodes: Sequence[IntakeNode],
) -> None:
    """Each answer verifies for a verifier that admits exactly ``nodes``."""
    trust = trust_in((n.keys.node_id, n.keys.chain_address) for n in nodes)
    for reply in answers:
        report = verify_result(reply, by_id[reply.request_id], trust=trust)
        assert report.ok, report.as_dict()


def positions(records: Sequence[Record]) -> dict[str, tuple[int, int]]:
    """request id → (partition, offset) of the requests on a topic."""
    return {(r.key or b"").decode(): (r.partition, r.offset) for r in records}


class IntakeContract:
    """Intake scenarios; the ``kafka`` fixture picks the backend."""

    @pytest.fixture
    async def spawn(self, kafka: KafkaEnv) -> AsyncIterator[Spawn]:
        nodes: list[IntakeNode] = []

        async def start(
            topics: Topics, engine: GatedEngine, *, seed: int = 1, **config: Any
        ) -> IntakeNode:
            settings = {
                "commit_interval_s": kafka.commit_interval_s,
                "drain_timeout_s": 5.0,
                "revoke_timeout_s": 5.0,
                **config,
            }
            node = IntakeNode(
                kafka,
                topics,
                engine,
                group=f"{topics.namespace}-workers",
                config=IntakeConfig(**settings),
                seed=seed,
            )
            nodes.append(node)
            return await node.start()

        try:
            yield start
        finally:
            for node in nodes:
                with contextlib.suppress(Exception):
                    await node.close()

    # -- (a) ------------------------------------------------------------------------------------

    async def test_each_request_gets_one_signed_reply_and_one_record_and_commits_reach_the_end(
        self, kafka: KafkaEnv, spawn: Spawn
    ) -> None:
        topics = await kafka.new_namespace([MODEL], partitions=4)
        requests = make_requests(40)
        by_id = {r.request_id: r for r in requests}
        await produce(kafka, topics, requests)
        node = await spawn(topics, GatedEngine(MODEL))

        answers = await replies(kafka, topics, at_least=len(requests))
        on_topic = await kafka.read(topics.infer(MODEL), at_least=len(requests))
        await committed_to_end(kafka, node.group, topics, end_offsets(on_topic, 4))
        await node.stop()

        assert sorted(r.request_id for r in answers) == sorted(by_id)  # each exactly once
        assert_verified(answers, by_id, [node])
        records = await settlement_records(kafka, topics, at_least=len(requests))
        assert sorted(r.envelope.request_id for r in records) == sorted(by_id)
        envelopes = {a.request_id: a.envelope for a in answers}
        for record in records:
            assert verify_envelope_signature(record.envelope, record.signature)
            assert record.envelope == envelopes[record.envelope.request_id]
        assert sorted(node.engine.calls) == sorted(by_id)
        assert {p for p, _ in positions(on_topic).values()} == {0, 1, 2, 3}
        assert node.audit.violations == []
        for p in range(4):
            sequence = node.audit.committed_sequence(TopicPartition(topics.infer(MODEL), p))
            assert sequence == sorted(set(sequence)), f"partition {p} commits went back"

    # -- (b) ------------------------------------------------------------------------------------

    async def test_commits_stop_at_an_unanswered_offset_until_it_is_answered(
        self, kafka: KafkaEnv, spawn: Spawn
    ) -> None:
        topics = await kafka.new_namespace([MODEL], partitions=1)
        requests = make_requests(10)
        gated = requests[3].request_id
        engine = GatedEngine(MODEL)
        engine.hold(gated)
        await produce(kafka, topics, requests)
        node = await spawn(topics, engine)
        topic = topics.infer(MODEL)

        await kafka.wait_until(lambda: len(node.audit.replied) == 9, "the 9 others answered")

        async def committed_at(offset: int) -> bool:
            return await kafka.committed(node.group, topic) == {0: offset}

        await kafka.wait_until(lambda: committed_at(3), "commit up to the gated offset")
        await asyncio.sleep(kafka.quiet_s)
        assert await kafka.committed(node.group, topic) == {0: 3}
        assert gated not in node.audit.replied
        assert max(node.audit.committed_sequence(TopicPartition(topic, 0))) == 3

        engine.release(gated)
        await kafka.wait_until(lambda: committed_at(10), "commit to the end once answered")
        await node.stop()
        assert sorted(r.request_id for r in await replies(kafka, topics, 10)) == sorted(
            r.request_id for r in requests
        )
        assert node.audit.violations == []

    # -- (c) ------------------------------------------------------------------------------------

    async def test_the_window_bounds_uncommitted_offsets_behind_a_stuck_head(
        self, kafka: KafkaEnv, spawn: Spawn
    ) -> None:
        window, n = 4, 20
        topics = await kafka.new_namespace([MODEL], partitions=1)
        requests = make_requests(n)
        offset_of = {r.request_id: i for i, r in enumerate(requests)}
        engine = GatedEngine(MODEL)
        engine.hold(requests[0].request_id)
        breaches: list[tuple[int, int]] = []

        def check_window(request_id: str) -> None:
            # Started offset minus the oldest unfinished one must stay below the window.
            finished = {offset_of[rid] for rid in engine.finished}
            oldest = min(i for i in range(n) if i not in finished)
            if offset_of[request_id] - oldest >= window:
                breaches.append((offset_of[request_id], oldest))

        engine.on_start = check_window
        await produce(kafka, topics, requests)
        node = await spawn(topics, engine, window_per_partition=window)
        topic = topics.infer(MODEL)

        await kafka.wait_until(lambda: len(engine.calls) == window, "the window filled")
        await asyncio.sleep(kafka.quiet_s)
        assert sorted(engine.calls) == sorted(r.request_id for r in requests[:window])
        assert len(engine.finished) == window - 1
        assert await kafka.committed(node.group, topic) == {0: None}

        engine.release(requests[0].request_id)

        async def all_committed() -> bool:
            return await kafka.committed(node.group, topic) == {0: n}

        await kafka.wait_until(all_committed, "everything committed after the head finished")
        await node.stop()
        assert sorted(engine.calls) == sorted(offset_of)  # each ran once, despite hand-backs
        assert breaches == []
        assert node.intake is not None and node.intake.max_concurrency_seen <= window
        assert len(await replies(kafka, topics, n)) == n
        assert node.audit.violations == []

    # -- (d) ------------------------------------------------------------------------------------

    async def test_a_second_worker_joining_mid_run_leaves_no_gap_and_settles_once_per_node(
        self, kafka: KafkaEnv, spawn: Spawn, tmp_path: Path
    ) -> None:
        topics = await kafka.new_namespace([MODEL], partitions=4)
        requests = make_requests(60)
        early, late = requests[:40], requests[40:]
        by_id = {r.request_id: r for r in requests}
        nodes = [TestNode.seeded(1), TestNode.seeded(2)]  # spawned below with these seeds
        for node in nodes:
            key, value = node.registration_message(models=(MODEL,), digest=GATED_DIGEST)
            async with kafka.producer() as producer:
                await producer.send_and_wait(topics.registry, value, key=key)
        settlement = SettlementRun(kafka, topics, tmp_path / "ledger.sqlite3", admitted=nodes)
        service = await settlement.start()
        try:
            await produce(kafka, topics, early)
            first = await spawn(topics, GatedEngine(MODEL), seed=1)
            await kafka.wait_until(lambda: len(first.audit.replied) >= 10, "first answers")
            second = await spawn(topics, GatedEngine(MODEL), seed=2)
            await kafka.wait_until(lambda: bool(second.consumer.assignment()), "second joined")
            await produce(kafka, topics, late)

            answers = await replies(kafka, topics, at_least=len(requests))
            on_topic = await kafka.read(topics.infer(MODEL), at_least=len(requests))
            ends = end_offsets(on_topic, 4)
            await committed_to_end(kafka, first.group, topics, ends)
            await asyncio.gather(first.stop(), second.stop())

            records = await settlement_records(kafka, topics, at_least=len(requests))
            settled = {(r.envelope.request_id, r.envelope.node_id) for r in records}
            ledger = service.ledger
            assert ledger is not None
            await kafka.wait_until(lambda: ledger.count() == len(settled), "ledger caught up")
            rows = {(row["request_id"], row["node_id"]) for rid in by_id for row in ledger.get(rid)}
            counts = settlement_counts(service)
        finally:
            await settlement.stop()

        # A clean hand-over: every request answered once, by one node or the other.
        assert sorted(r.request_id for r in answers) == sorted(by_id)
        assert_verified(answers, by_id, [first, second])
        by_node = Counter(r.envelope.node_id for r in answers)
        assert by_node[first.node_id] > 0 and by_node[second.node_id] > 0, by_node
        late_ids = {r.request_id for r in late}
        assert any(
            r.envelope.node_id == second.node_id for r in answers if r.request_id in late_ids
        )
        assert len(records) == len(settled) == len(requests)
        assert rows == settled == {(r.request_id, r.envelope.node_id) for r in answers}
        assert counts["rejected"] == 0
        assert await kafka.committed(first.group, topics.infer(MODEL)) == ends
        assert first.audit.violations == [] and second.audit.violations == []

    # -- (e) ------------------------------------------------------------------------------------

    async def test_stop_drains_in_flight_work_commits_it_and_a_successor_answers_the_rest(
        self, kafka: KafkaEnv, spawn: Spawn
    ) -> None:
        window, n, drain_timeout_s = 4, 12, 5.0
        topics = await kafka.new_namespace([MODEL], partitions=1)
        requests = make_requests(n)
        ids = [r.request_id for r in requests]
        engine = GatedEngine(MODEL)
        engine.hold_all()
        await produce(kafka, topics, requests)
        first = await spawn(
            topics, engine, window_per_partition=window, drain_timeout_s=drain_timeout_s
        )
        topic = topics.infer(MODEL)
        await kafka.wait_until(lambda: len(engine.calls) == window, "the window in flight")
        assert engine.finished == []

        loop = asyncio.get_running_loop()
        started = loop.time()
        assert first.intake is not None
        first.intake.stop()
        loop.call_later(kafka.quiet_s, engine.release_all)  # finishes only while draining
        await first.stop()
        assert loop.time() - started < drain_timeout_s
        # Stopping stops fetching: nothing fetched after stop() may start (it would lengthen
        # the drain, and be cut off by drain_timeout_s on a slow engine).
        assert len(engine.calls) == window, "intake admitted records fetched after stop()"
        assert sorted(engine.finished) == sorted(ids[:window])
        assert await kafka.committed(first.group, topic) == {0: window}
        assert first.audit.replied == set(ids[:window])

        successor_engine = GatedEngine(MODEL)
        second = await spawn(topics, successor_engine, seed=2)

        async def all_committed() -> bool:
            return await kafka.committed(second.group, topic) == {0: n}

        await kafka.wait_until(all_committed, "the successor committed the rest")
        await second.stop()
        assert successor_engine.calls == ids[window:]  # the rest, in order, nothing again
        answers = await replies(kafka, topics, n)
        assert sorted(r.request_id for r in answers) == sorted(ids)
        who = {r.request_id: r.envelope.node_id for r in answers}
        assert {who[rid] for rid in ids[:window]} == {first.node_id}
        assert {who[rid] for rid in ids[window:]} == {second.node_id}
        assert first.audit.violations == [] and second.audit.violations == []

    # -- (f) ------------------------------------------------------------------------------------

    async def test_the_same_request_twice_gets_one_reply(
        self, kafka: KafkaEnv, spawn: Spawn
    ) -> None:
        topics = await kafka.new_namespace([MODEL], partitions=4)
        requests = make_requests(8)
        twice = requests[0]
        await produce(kafka, topics, [*requests, twice])  # a copy while it may be in flight
        engine = GatedEngine(MODEL)
        node = await spawn(topics, engine)
        await kafka.wait_until(lambda: len(node.audit.replied) == len(requests), "all answered")
        await produce(kafka, topics, [twice])  # and a copy after it was answered

        on_topic = await kafka.read(topics.infer(MODEL), at_least=len(requests) + 2)
        assert len(on_topic) == len(requests) + 2
        await committed_to_end(kafka, node.group, topics, end_offsets(on_topic, 4))
        await node.stop()

        answers = await replies(kafka, topics, len(requests))
        assert Counter(r.request_id for r in answers) == Counter(r.request_id for r in requests)
        records = await settlement_records(kafka, topics, len(requests))
        assert len(records) == len(requests)
        assert engine.calls.count(twice.request_id) == 1
        assert node.audit.violations == []

    # -- (g) ------------------------------------------------------------------------------------

    async def test_after_a_crash_the_successor_answers_exactly_the_uncommitted_offsets(
        self, kafka: KafkaEnv, spawn: Spawn
    ) -> None:
        n = 24
        topics = await kafka.new_namespace([MODEL], partitions=4)
        requests = make_requests(n)
        by_id = {r.request_id: r for r in requests}
        await produce(kafka, topics, requests)
        on_topic = await kafka.read(topics.infer(MODEL), at_least=n)
        where = positions(on_topic)
        per_partition: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for rid, (p, offset) in where.items():
            per_partition[p].append((offset, rid))
        partition = max(per_partition, key=lambda p: len(per_partition[p]))
        assert len(per_partition[partition]) >= 3
        stuck = dict(per_partition[partition])[1]  # offset 1: one before it, some after it

        engine = GatedEngine(MODEL)
        engine.hold(stuck)
        first = await spawn(topics, engine, seed=1, drain_timeout_s=0.05)
        ends = end_offsets(on_topic, 4)
        at_crash = {**ends, partition: 1}

        async def committed_up_to_the_stuck_one() -> bool:
            return await kafka.committed(first.group, topics.infer(MODEL)) == at_crash

        await kafka.wait_until(lambda: len(first.audit.replied) == n - 1, "all but one answered")
        await kafka.wait_until(committed_up_to_the_stuck_one, "commits up to the stuck offset")
        await first.crash()
        assert await kafka.committed(first.group, topics.infer(MODEL)) == at_crash

        successor = GatedEngine(MODEL)
        second = await spawn(topics, successor, seed=2)
        await committed_to_end(kafka, second.group, topics, ends)
        await second.stop()

        redelivered = {rid for rid, (p, offset) in where.items() if p == partition and offset >= 1}
        assert sorted(successor.calls) == sorted(redelivered)
        answers = await replies(kafka, topics, n + len(redelivered) - 1)
        assert_verified(answers, by_id, [first, second])
        answered_by: dict[str, list[str]] = defaultdict(list)
        for reply in answers:
            answered_by[reply.request_id].append(reply.envelope.node_id)
        assert answered_by[stuck] == [second.node_id]
        for rid in redelivered - {stuck}:  # answered before the crash, not committed
            assert sorted(answered_by[rid]) == sorted([first.node_id, second.node_id])
        for rid in set(by_id) - redelivered:
            assert answered_by[rid] == [first.node_id]
        outputs = defaultdict(set)
        for reply in answers:
            outputs[reply.request_id].add(reply.envelope.output_hash)
        assert all(len(hashes) == 1 for hashes in outputs.values())  # duplicates agree
        assert first.audit.violations == [] and second.audit.violations == []


class TestIntake(IntakeContract):
    """Runs every scenario on each backend of the ``kafka`` fixture (memory, tansu)."""
