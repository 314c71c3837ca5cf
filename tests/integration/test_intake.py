"""Intake on the real broker: window concurrency, slow engines, rebalances, drain and crashes.

Every test uses fixed-latency models (``worker.engines.fixed``) in its own namespace and consumer
group, so what is measured is the intake itself: how many requests run at once, whether offsets
are committed only over answered requests, and whether redelivery after a crash answers every
request without ever producing a reply that disagrees with another reply to the same request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from client import InferenceClient, build_request, verify_result
from infra.dev.broker import BrokerProcess
from infra.dev.demo_models import add_fixed_latency_model
from infra.kafka import KafkaSettings
from infra.kafka.admin import ensure_topics
from schemas import (
    ChatInput,
    ErrorReply,
    InferenceRequest,
    InferenceResult,
    MLInput,
    Reply,
    SettlementRecord,
    Tensor,
    Topics,
)
from schemas.topics import standard_topics
from settlement.app import SettlementService
from settlement.settings import SettlementSettings
from tests.harness.admission import AdmissionFile, trust_in
from tests.harness.support import eventually, fast_kafka, read_topic, settlement_rejections
from worker.app import Worker
from worker.engines.base import Engine, EngineResult, RunContext
from worker.engines.fixed import FixedLatencyEngine
from worker.settings import WorkerSettings

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
_REPLY: TypeAdapter[InferenceResult | ErrorReply] = TypeAdapter(Reply)

AnyFuture = asyncio.Future[InferenceResult | ErrorReply]


# -- helpers ---------------------------------------------------------------------------------


def _ml(i: int) -> MLInput:
    row = [i / 10, -i / 20, 1.0, float(i % 7)]
    return MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=row)})


def _requests(model: str, n: int) -> list[InferenceRequest]:
    return [build_request(model, _ml(i)) for i in range(n)]


async def _new_namespace(bootstrap: str, model: str, partitions: int) -> str:
    ns = "t" + uuid.uuid4().hex[:12]
    await ensure_topics(bootstrap, standard_topics(ns, [model], request_partitions=partitions))
    return ns


def _hub(tmp_path: Path, model: str, latency_ms: float) -> Path:
    hub = tmp_path / "hub"
    add_fixed_latency_model(hub, model, latency_ms)
    return hub


_DEPLOYMENT: list[AdmissionFile] = []
"""The running test's admission authority: every worker the helpers below make is admitted."""


@pytest.fixture(autouse=True)
def _deployment(admission: AdmissionFile) -> Iterator[None]:
    _DEPLOYMENT.append(admission)
    yield
    _DEPLOYMENT.clear()


def _admission() -> AdmissionFile:
    return _DEPLOYMENT[0]


def _client(kafka: KafkaSettings, topics: Topics) -> InferenceClient:
    return InferenceClient(kafka, topics, admission=_admission().settings())


def _worker_settings(
    kafka: KafkaSettings, ns: str, model: str, hub: Path, state: Path, **overrides: Any
) -> WorkerSettings:
    settings = WorkerSettings(
        namespace=ns,
        kafka=kafka,
        group_id=f"{ns}-workers",
        models=[model],
        hub_dir=hub,
        cache_dir=state / "cache",
        key_dir=state / "keys",
        admission=_admission().settings(),
        **overrides,
    )
    _admission().admit_worker(settings)
    return settings


class _InProcess:
    """An in-process worker whose run loop can be stopped separately from closing it."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.worker = Worker(settings)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Worker:
        await self.worker.setup()
        self._task = asyncio.create_task(self.worker.run())
        return self.worker

    async def stop(self) -> None:
        self.worker.stop()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    async def close(self) -> None:
        try:
            await self.stop()
        finally:
            await self.worker.close()


@contextlib.asynccontextmanager
async def _serving(settings: WorkerSettings) -> AsyncIterator[Worker]:
    proc = _InProcess(settings)
    try:
        yield await proc.start()
    finally:
        await proc.close()


async def _send_all(
    client: InferenceClient, requests: Iterable[InferenceRequest], chunk: int = 200
) -> list[AnyFuture]:
    """Produce concurrently (acknowledged by the broker); the futures of their replies."""
    batch = list(requests)
    futures: list[AnyFuture] = []
    for start in range(0, len(batch), chunk):
        futures += await asyncio.gather(*(client.send(r) for r in batch[start : start + chunk]))
    return futures


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """partition → committed offset of ``group`` (-1 when none). Uses ``committed()``: the
    admin ``list_consumer_group_offsets`` closes the connection on Tansu."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()
        result = {}
        for p in sorted(consumer.partitions_for_topic(topic) or ()):
            committed = await consumer.committed(TopicPartition(topic, p))
            result[p] = -1 if committed is None else committed
        return result
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


async def _end_offsets(bootstrap: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    """partition → end offset, from the records themselves: Tansu answers ListOffsets(latest)
    with the base offset of the last record batch + 1, not the high watermark."""
    records = await read_topic(bootstrap, topic)
    ends = dict.fromkeys(partitions, 0)
    for m in records:
        ends[m.partition] = max(ends[m.partition], m.offset + 1)
    return ends


async def _raw_replies(bootstrap: str, topics: Topics) -> list[InferenceResult | ErrorReply]:
    """Every message on the reply topic, each validated as a ``Reply`` (fails when malformed)."""
    messages = await read_topic(bootstrap, topics.replies)
    replies = []
    for m in messages:
        reply = _REPLY.validate_json(m.value)
        assert m.key is not None and m.key.decode() == reply.request_id
        replies.append(reply)
    return replies


def _assert_duplicates_agree(
    replies: list[InferenceResult | ErrorReply], by_id: dict[str, InferenceRequest]
) -> None:
    """Duplicates only ever repeat the answer: every reply is a verified result for a request
    that was sent, and all replies to one request id carry the same output and input hash."""
    hashes: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for reply in replies:
        assert isinstance(reply, InferenceResult), reply
        assert reply.request_id in by_id
        trust = trust_in(_admission().nodes.items())
        report = verify_result(reply, by_id[reply.request_id], trust=trust)
        assert report.ok, report.as_dict()
        hashes[reply.request_id].add((reply.envelope.output_hash, reply.envelope.input_hash))
    disagreeing = {rid: h for rid, h in hashes.items() if len(h) != 1}
    assert not disagreeing


def _child_env(
    bootstrap: str, ns: str, model: str, hub: Path, state: Path, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OG_WORKER_")}
    _admission().admit_worker(_worker_settings(KafkaSettings(), ns, model, hub, state))
    env.update(_admission().env("OG_WORKER_"))
    env.update(
        {
            "OG_WORKER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "OG_WORKER_KAFKA__SESSION_TIMEOUT_MS": "3000",
            "OG_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            "OG_WORKER_NAMESPACE": ns,
            "OG_WORKER_MODELS": json.dumps([model]),
            "OG_WORKER_HUB_DIR": str(hub),
            "OG_WORKER_CACHE_DIR": str(state / "cache"),
            "OG_WORKER_KEY_DIR": str(state / "keys"),
            "OG_WORKER_GROUP_ID": f"{ns}-workers",
            "OG_WORKER_LOG_LEVEL": "INFO",
            **extra,
        }
    )
    return env


class _Child:
    """``inference-node worker`` as a real process; its JSON log goes to a file."""

    def __init__(self, env: dict[str, str], run_dir: Path, name: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.ready = run_dir / f"{name}.ready"
        self.log = run_dir / f"{name}.log"
        self.ready.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nodecli.main", "worker", "--ready-file", str(self.ready)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-30:])
        except OSError:
            return ""

    async def wait_ready(self, timeout_s: float = 60.0) -> str:
        """The node id (the ready file's text) once the worker is set up."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.ready.exists():
            rc = self.proc.poll()
            assert rc is None, f"worker exited with {rc} before ready:\n{self.tail()}"
            assert asyncio.get_running_loop().time() < deadline, f"not ready:\n{self.tail()}"
            await asyncio.sleep(0.05)
        return self.ready.read_text().strip()

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def assigned_partitions(self) -> list[str] | None:
        """The partitions of the latest assignment logged, or None before the first one."""
        latest = None
        for entry in self.log_entries():
            if entry.get("msg") == "partitions assigned":
                latest = list(entry.get("partitions", []))
        return latest

    async def wait_exit(self, timeout_s: float) -> int | None:
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# -- 1. concurrency reaches the window -------------------------------------------------------


@pytest.mark.parametrize("window", [64, 8])
async def test_concurrency_reaches_the_window_and_never_exceeds_it(
    broker: BrokerProcess, tmp_path: Path, window: int
) -> None:
    model = "fixed-50"
    hub = _hub(tmp_path, model, 50)
    ns = await _new_namespace(broker.bootstrap, model, partitions=1)
    topics = Topics(ns)
    settings = _worker_settings(
        fast_kafka(broker.bootstrap),
        ns,
        model,
        hub,
        tmp_path,
        window_per_partition=window,
        max_in_flight=256,
    )
    # Four windows' worth: the window fills again after each drains (a small window refills
    # after a consumer fetch wait each time, so more requests would only add waiting).
    requests = _requests(model, 4 * window)

    async with _client(fast_kafka(broker.bootstrap), topics) as client:
        # Everything is on the partition before the worker starts, so the window can fill
        # regardless of how fast this test produces.
        futures = await _send_all(client, requests)
        async with _serving(settings) as worker:
            replies = await asyncio.wait_for(asyncio.gather(*futures), 90)
            engine = worker.engines[model]
            assert isinstance(engine, FixedLatencyEngine)
            assert worker.intake is not None
            assert engine.max_running == window
            assert worker.intake.max_concurrency_seen == window
            assert engine.running == 0

    assert all(isinstance(r, InferenceResult) for r in replies)
    assert {r.request_id for r in replies} == {r.request_id for r in requests}


# -- 2. an engine slower than max_poll_interval_ms ---------------------------------------------


async def test_engine_slower_than_max_poll_interval_keeps_partitions(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    model = "fixed-2500"
    hub = _hub(tmp_path, model, 2500)
    ns = await _new_namespace(broker.bootstrap, model, partitions=4)
    topics = Topics(ns)
    kafka = KafkaSettings(
        bootstrap_servers=broker.bootstrap,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        max_poll_interval_ms=1000,
    )
    settings = _worker_settings(kafka, ns, model, hub, tmp_path, window_per_partition=16)
    requests = _requests(model, 20)
    revoked: list[set[TopicPartition]] = []
    assigned: list[set[TopicPartition]] = []

    async with _client(fast_kafka(broker.bootstrap), topics) as client:
        async with _serving(settings) as worker:
            intake = worker.intake
            assert intake is not None
            # The listener looks these up on the intake at call time.
            original_revoked, original_assigned = intake._on_revoked, intake._on_assigned

            async def on_revoked(tps: set[TopicPartition]) -> None:
                revoked.append(set(tps))
                await original_revoked(tps)

            def on_assigned(tps: set[TopicPartition]) -> None:
                assigned.append(set(tps))
                original_assigned(tps)

            intake._on_revoked = on_revoked  # type: ignore[method-assign]
            intake._on_assigned = on_assigned  # type: ignore[method-assign]
            # consumer.start() in setup() already joined the group (before the wrappers).
            await eventually(lambda: len(intake._parts) == 4, timeout_s=30)

            futures = await _send_all(client, requests)
            replies = await asyncio.wait_for(asyncio.gather(*futures), 60)
            during_run, assignments = list(revoked), list(assigned)

    assert all(isinstance(r, InferenceResult) for r in replies)
    assert during_run == [], f"partitions revoked while the engine was busy: {during_run}"
    assert assignments == [], f"the group rebalanced while serving: {assignments}"
    raw = await _raw_replies(broker.bootstrap, topics)
    counts = Counter(r.request_id for r in raw)
    assert set(counts) == {r.request_id for r in requests}
    assert set(counts.values()) == {1}, counts


# -- 3. a second worker joins mid-run ---------------------------------------------------------


async def test_rebalance_mid_run_answers_everything_and_commits_to_the_end(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    model = "fixed-20"
    hub = _hub(tmp_path, model, 20)
    ns = await _new_namespace(broker.bootstrap, model, partitions=4)
    topics = Topics(ns)
    kafka = fast_kafka(broker.bootstrap)
    proc_a = _InProcess(_worker_settings(kafka, ns, model, hub, tmp_path / "a"))
    proc_b = _InProcess(_worker_settings(kafka, ns, model, hub, tmp_path / "b"))
    requests = _requests(model, 600)
    held_back = 100  # produced only once B owns partitions, so B is sure to answer some
    futures: list[AnyFuture] = []
    b_started = asyncio.Event()

    try:
        worker_a = await proc_a.start()
        async with _client(kafka, topics) as client:

            async def produce() -> None:
                # ~3 s at a steady pace; B starts after ~1 s.
                for start in range(0, len(requests) - held_back, 20):
                    futures.extend(await _send_all(client, requests[start : start + 20]))
                    await asyncio.sleep(0.1)
                await b_started.wait()
                assert proc_b.worker.intake is not None
                intake_b = proc_b.worker.intake
                await eventually(lambda: bool(intake_b._parts), timeout_s=30)
                for start in range(len(requests) - held_back, len(requests), 20):
                    futures.extend(await _send_all(client, requests[start : start + 20]))
                    await asyncio.sleep(0.1)

            producer = asyncio.create_task(produce())
            try:
                await asyncio.sleep(1.0)
                worker_b = await proc_b.start()
                b_started.set()
                await asyncio.wait_for(producer, 60)
            finally:
                if not producer.done():
                    producer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await producer
            replies = await asyncio.wait_for(asyncio.gather(*futures), 90)
        await asyncio.gather(proc_a.stop(), proc_b.stop())
    finally:
        await asyncio.gather(proc_a.close(), proc_b.close(), return_exceptions=True)

    assert {r.request_id for r in replies} == {r.request_id for r in requests}
    by_id = {r.request_id: r for r in requests}
    raw = await _raw_replies(broker.bootstrap, topics)  # every message validates as a Reply
    assert {r.request_id for r in raw} == set(by_id)
    _assert_duplicates_agree(raw, by_id)
    node_ids = {r.envelope.node_id for r in raw if isinstance(r, InferenceResult)}
    assert node_ids == {worker_a.signer.node_id, worker_b.signer.node_id}

    committed = await _committed(broker.bootstrap, f"{ns}-workers", topics.infer(model))
    ends = await _end_offsets(broker.bootstrap, topics.infer(model), committed)
    assert sum(ends.values()) == len(requests)
    assert committed == ends, "answered requests left uncommitted after both workers stopped"


# -- 3b. commits never pass an unanswered offset ---------------------------------------------


class _Gated:
    """Wraps an engine; the request whose first input value is ``blocked_x0`` waits for
    ``release`` (never set here), so it finishes after everything behind it on its partition."""

    def __init__(self, inner: Engine, blocked_x0: float) -> None:
        self._inner = inner
        self._blocked_x0 = blocked_x0
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()

    @property
    def model_name(self) -> str:
        return self._inner.model_name

    @property
    def model_digest(self) -> str:
        return self._inner.model_digest

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        assert isinstance(payload, MLInput)
        if payload.tensors["x"].data[0] == self._blocked_x0:
            self.blocked.set()
            await self.release.wait()
        return await self._inner.run(payload, ctx)

    async def close(self) -> None:
        await self._inner.close()


async def test_commit_stops_at_an_unanswered_offset_and_a_successor_answers_it(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    model = "fixed-10"
    hub = _hub(tmp_path, model, 10)
    ns = await _new_namespace(broker.bootstrap, model, partitions=1)
    topics = Topics(ns)
    group, topic = f"{ns}-workers", topics.infer(model)
    kafka = fast_kafka(broker.bootstrap)
    requests = _requests(model, 20)
    stuck = requests[3]

    async with _client(kafka, topics) as client:
        sent = await _send_all(client, requests)
        futures = dict(zip([r.request_id for r in requests], sent, strict=True))
        on_topic = await read_topic(broker.bootstrap, topic)
        stuck_offset = next(m.offset for m in on_topic if m.key == stuck.request_id.encode())
        first = _InProcess(
            _worker_settings(kafka, ns, model, hub, tmp_path / "a", drain_timeout_s=0.5)
        )
        try:
            worker = await first.start()
            gate = _Gated(worker.engines[model], blocked_x0=_ml(3).tensors["x"].data[0])
            worker.engines[model] = gate  # the pipeline looks engines up in this dict
            others = [f for rid, f in futures.items() if rid != stuck.request_id]
            await asyncio.wait_for(asyncio.gather(*others), 60)
            assert gate.blocked.is_set() and not futures[stuck.request_id].done()

            # Everything before the stuck offset is committed, nothing after it.
            async def committed_up_to_the_gap() -> bool:
                return await _committed(broker.bootstrap, group, topic) == {0: stuck_offset}

            await eventually(committed_up_to_the_gap, timeout_s=10)
        finally:
            await first.close()  # the drain gives up on the stuck request after 0.5 s
        assert await _committed(broker.bootstrap, group, topic) == {0: stuck_offset}
        assert not futures[stuck.request_id].done()

        async with _serving(_worker_settings(kafka, ns, model, hub, tmp_path / "b")):
            reply = await asyncio.wait_for(futures[stuck.request_id], 60)
        assert isinstance(reply, InferenceResult)
    assert await _committed(broker.bootstrap, group, topic) == {0: len(requests)}


# -- 4. SIGTERM drains in-flight work and commits it -----------------------------------------


async def test_sigterm_drains_commits_answered_work_and_a_successor_answers_the_rest(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    model = "fixed-200"
    drain_timeout_s = 10
    hub = _hub(tmp_path, model, 200)
    # One partition, everything produced before the worker starts: it admits max_in_flight
    # (256) requests at once and runs 64 of them at a time (the window), so when the first 64
    # answers are out, 192 admitted requests are still waiting and 44 are not fetched yet.
    ns = await _new_namespace(broker.bootstrap, model, partitions=1)
    topics = Topics(ns)
    env = _child_env(
        broker.bootstrap,
        ns,
        model,
        hub,
        tmp_path / "node",
        OG_WORKER_DRAIN_TIMEOUT_S=str(drain_timeout_s),
        OG_WORKER_WINDOW_PER_PARTITION="64",
        OG_WORKER_MAX_IN_FLIGHT="256",
    )
    requests = _requests(model, 300)
    by_id = {r.request_id: r for r in requests}
    children: list[_Child] = []

    try:
        async with _client(fast_kafka(broker.bootstrap), topics) as client:
            futures = await _send_all(client, requests)
            first = _Child(env, tmp_path / "run", "first")
            children.append(first)
            await first.wait_ready()
            # Stop while work is in flight: as soon as the first answers are out.
            done, _ = await asyncio.wait(futures, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            assert done, f"no reply at all:\n{first.tail()}"
            first.proc.send_signal(signal.SIGTERM)
            answered_at_signal = {f.result().request_id for f in futures if f.done()}
            rc = await first.wait_exit(drain_timeout_s + 8)
            assert rc == 0, f"exit {rc} after SIGTERM:\n{first.tail()}"

            committed = await _committed(broker.bootstrap, f"{ns}-workers", topics.infer(model))
            raw_requests = await read_topic(broker.bootstrap, topics.infer(model))
            assert len(raw_requests) == len(requests)
            below_committed = {
                m.key.decode()
                for m in raw_requests
                if m.offset < committed[m.partition]  # -1 (nothing committed) excludes all
            }
            answered_by_first = {r.request_id for r in await _raw_replies(broker.bootstrap, topics)}
            assert below_committed, "the drained worker committed nothing"
            missing = below_committed - answered_by_first
            assert not missing, f"{len(missing)} committed requests were never answered"
            # Drain finished every admitted request, and committed all of them: nothing it
            # answered is left for its successor to answer again.
            uncommitted_answers = answered_by_first - below_committed
            assert not uncommitted_answers, (
                f"{len(uncommitted_answers)} answered but not committed by the drained worker"
            )
            assert answered_by_first > answered_at_signal, "nothing was drained after SIGTERM"
            assert len(below_committed) < len(requests), "nothing left for the successor"

            second = _Child(env, tmp_path / "run", "second")
            children.append(second)
            await second.wait_ready()
            replies = await asyncio.wait_for(asyncio.gather(*futures), 90)
            second.proc.send_signal(signal.SIGTERM)
            assert await second.wait_exit(drain_timeout_s + 8) == 0, second.tail()
    finally:
        for child in children:
            child.kill()

    assert {r.request_id for r in replies} == set(by_id)
    raw = await _raw_replies(broker.bootstrap, topics)
    _assert_duplicates_agree(raw, by_id)
    counts = Counter(r.request_id for r in raw)
    assert set(counts) == set(by_id)
    assert set(counts.values()) == {1}, "a clean hand-over must not answer anything twice"


# -- 5. SIGKILL one of two workers and restart it --------------------------------------------


async def test_sigkill_and_restart_answers_all_2000_and_settles_each_once_per_node(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    model = "fixed-5"
    n = 2000
    rng = random.Random(0x1D7A4E)
    kill_after = int(n * rng.uniform(0.2, 0.6))
    victim = rng.randrange(2)

    hub = _hub(tmp_path, model, 5)
    ns = await _new_namespace(broker.bootstrap, model, partitions=4)
    topics = Topics(ns)
    envs = [
        _child_env(
            broker.bootstrap,
            ns,
            model,
            hub,
            tmp_path / f"node-{i}",
            OG_WORKER_WINDOW_PER_PARTITION="64",
            OG_WORKER_DRAIN_TIMEOUT_S="10",
        )
        for i in range(2)
    ]
    requests = _requests(model, n)
    by_id = {r.request_id: r for r in requests}
    settlement = SettlementService(
        SettlementSettings(
            namespace=ns,
            kafka=fast_kafka(broker.bootstrap),
            group_id=f"{ns}-settlement",
            ledger_url=str(tmp_path / "ledger.sqlite3"),
            admission=_admission().settings(),
        )
    )
    children: list[_Child] = []
    settle_task: asyncio.Task[None] | None = None

    try:
        await settlement.setup()
        settle_task = asyncio.create_task(settlement.run())
        workers = [_Child(envs[i], tmp_path / "run", f"w{i}") for i in range(2)]
        children.extend(workers)
        node_ids = [await w.wait_ready() for w in workers]
        assert len(set(node_ids)) == 2
        # Both own partitions before any request is produced, so the victim has work to lose.
        await eventually(lambda: all(w.assigned_partitions() for w in workers), timeout_s=60)

        async with _client(fast_kafka(broker.bootstrap), topics) as client:
            futures: list[AnyFuture] = []

            async def produce() -> None:
                # A steady ~1,000 requests/s, so the kill lands while traffic still flows.
                for start in range(0, n, 50):
                    futures.extend(await _send_all(client, requests[start : start + 50]))
                    await asyncio.sleep(0.05)

            producer = asyncio.create_task(produce())
            try:
                deadline = asyncio.get_running_loop().time() + 90
                while sum(f.done() for f in futures) < kill_after:
                    assert asyncio.get_running_loop().time() < deadline, workers[victim].tail()
                    await asyncio.sleep(0.01)
                answered_at_kill = sum(f.done() for f in futures)
                workers[victim].kill()
                assert answered_at_kill < n, "everything answered before the kill: test too weak"

                restarted = _Child(envs[victim], tmp_path / "run", f"w{victim}-restarted")
                children.append(restarted)
                assert await restarted.wait_ready() == node_ids[victim]  # same key dir
                await asyncio.wait_for(producer, 60)
            finally:
                if not producer.done():
                    producer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await producer
            replies = await asyncio.wait_for(asyncio.gather(*futures), 120)

        survivors = [workers[1 - victim], restarted]
        for child in survivors:
            child.proc.send_signal(signal.SIGTERM)
        for child in survivors:
            assert await child.wait_exit(20) == 0, child.tail()

        assert {r.request_id for r in replies} == set(by_id)
        raw = await _raw_replies(broker.bootstrap, topics)  # every message validates as a Reply
        assert {r.request_id for r in raw} == set(by_id)
        _assert_duplicates_agree(raw, by_id)
        assert {r.envelope.node_id for r in raw if isinstance(r, InferenceResult)} <= set(node_ids)

        # The ledger: one row per (request id, node id) that published a settlement record.
        # A request answered by both nodes (redelivered after the kill) is settled once per node.
        settled = {
            (rec.envelope.request_id, rec.envelope.node_id)
            for rec in (
                SettlementRecord.model_validate_json(m.value)
                for m in await read_topic(broker.bootstrap, topics.settlement)
            )
        }
        assert {rid for rid, _ in settled} == set(by_id)
        ledger = settlement.ledger
        assert ledger is not None
        await eventually(lambda: ledger.count() == len(settled), timeout_s=60)
        rows = {rid: ledger.get(rid) for rid in by_id}
        assert all(rows.values()), "a request id is missing from the ledger"
        assert sum(len(r) for r in rows.values()) == ledger.count() == len(settled)
        assert {(row["request_id"], row["node_id"]) for r in rows.values() for row in r} == settled
        assert all(len({row["output_hash"] for row in r}) == 1 for r in rows.values())
        # The only refusals: a restarted victim that re-answered offsets it had not committed
        # publishes a second record for (request, its node) in another message, booked once
        # and refused as a replay (how many depends on where the kill landed).
        assert set(settlement_rejections(settlement)) <= {"replay"}
    finally:
        for child in children:
            child.kill()
        settlement.stop()
        if settle_task is not None:
            await asyncio.wait_for(settle_task, 30)
        await settlement.close()


async def test_a_second_signal_exits_at_once_without_draining(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    model = "fixed-5000"
    hub = _hub(tmp_path, model, 5000)
    ns = await _new_namespace(broker.bootstrap, model, partitions=1)
    env = _child_env(
        broker.bootstrap, ns, model, hub, tmp_path / "node", OG_WORKER_DRAIN_TIMEOUT_S="30"
    )
    child = _Child(env, tmp_path / "run", "impatient")
    try:
        async with _client(fast_kafka(broker.bootstrap), Topics(ns)) as client:
            await _send_all(client, _requests(model, 10))
            await child.wait_ready()
            await asyncio.sleep(1.0)  # requests are now executing (5 s each)
            child.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            child.proc.send_signal(signal.SIGTERM)
            # Far sooner than the 5 s engine or the 30 s drain bound.
            assert await child.wait_exit(3) == 130, child.tail()
    finally:
        child.kill()
