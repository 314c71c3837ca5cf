"""Observability on the real broker: the metrics endpoint scraped during an end-to-end run moves
by exactly what was sent; trace context is generated or carried from request to reply,
settlement record and dead letter, into the worker's logs and its OpenTelemetry spans;
consumer lag is measured; readiness follows the broker and `inference-node check` with it.

The worker is built from its parts here, wired the way the composition root wires them (metrics
into Publisher and Intake, the registry served by HealthServer), so this runs whether or not
``worker.app`` has the wiring yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from client.requests import build_request
from infra.dev.broker import BrokerProcess, running_broker
from infra.health import HealthServer, kafka_reachable
from infra.kafka import KafkaSettings
from infra.kafka.admin import ensure_topics
from infra.kafka.client import ClusterKafka
from infra.kafka.ports import TopicPartition as PortTopicPartition
from infra.logs import ContextFilter, JsonFormatter
from infra.tracing import TraceContext, Tracing
from nodecli.check import check
from schemas import MLInput, Tensor, Topics, encode
from schemas.requests import InferenceRequest
from schemas.signing import ChainSigner
from schemas.topics import standard_topics
from tests.harness.support import eventually, read_topic
from worker.app import compose_intake, load_engines
from worker.identity import chain_key, dlq_public_key, node_signer
from worker.intake import Intake, IntakeConfig
from worker.metrics import WorkerMetrics
from worker.pipeline import Pipeline
from worker.settings import WorkerSettings

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
SENT_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _ml(i: int) -> MLInput:
    return MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[i, 0.5, -1.0, 2.0])})


@dataclass
class _Node:
    metrics: WorkerMetrics
    health: HealthServer
    spans: InMemorySpanExporter
    intake: Intake


@contextlib.asynccontextmanager
async def _worker(settings: WorkerSettings) -> AsyncIterator[_Node]:
    """The worker's parts with metrics, health and tracing wired in (see module docstring)."""
    metrics = WorkerMetrics()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing.from_provider(provider)
    engines = await load_engines(settings)
    kafka = ClusterKafka(settings.kafka)
    producer = kafka.producer()
    consumer = kafka.consumer(settings.group_id)
    intake = compose_intake(
        consumer,
        producer,
        Pipeline(engines, node_signer(settings), ChainSigner(chain_key(settings))),
        settings.topics,
        IntakeConfig(metrics_interval_s=0.2),
        dlq_key=dlq_public_key(settings),
        metrics=metrics,
        tracer=tracing.tracer,
    )
    health = HealthServer(
        registry=metrics.registry,
        ready={"models_loaded": lambda: bool(engines), "broker": kafka_reachable(settings.kafka)},
    )
    await health.start()
    await producer.start()
    consumer.subscribe([settings.topics.infer(m) for m in engines], intake.rebalance_listener())
    await consumer.start()
    task = asyncio.create_task(intake.run())
    try:
        yield _Node(metrics, health, exporter, intake)
    finally:
        intake.stop()
        await asyncio.wait_for(task, 30)
        await consumer.stop()
        await producer.stop()
        for engine in engines.values():
            await engine.close()
        await health.stop()
        tracing.shutdown()


async def _scrape(health: HealthServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(health.url("/metrics"))
    assert response.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _get(scrape: dict[Any, float], name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("worker")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_metrics_traces_and_logs_during_an_end_to_end_run(
    broker: BrokerProcess, worker_settings: WorkerSettings, json_log: io.StringIO
) -> None:
    settings = worker_settings.model_copy(update={"models": ["demo-mlp"]})
    topics = Topics(settings.namespace)
    topic = topics.infer("demo-mlp")
    labels = {"model": "demo-mlp", "mode": "VANILLA"}
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()

    async def send(request: InferenceRequest, *headers: tuple[str, bytes]) -> None:
        await producer.send_and_wait(
            topic, encode(request), key=request.request_id.encode(), headers=list(headers)
        )

    try:
        async with _worker(settings) as node:
            before = await _scrape(node.health)
            good = [build_request("demo-mlp", _ml(i)) for i in range(5)]
            # Unknown model: it names a model this topic does not carry.
            unknown = [build_request("no-such-model", _ml(i)) for i in range(2)]
            await send(good[0], ("traceparent", SENT_TRACE.encode()))
            for request in good[1:] + unknown:
                await send(request)

            async def answered() -> bool:
                now = await _scrape(node.health)
                return (
                    _get(now, "og_worker_requests_total", **labels, outcome="result") == 5
                    and _get(now, "og_worker_requests_total", **labels, outcome="unknown_model")
                    == 2
                )

            await eventually(answered, timeout_s=60)
            after = await _scrape(node.health)

            def moved(name: str, **lbl: str) -> float:
                return _get(after, name, **lbl) - _get(before, name, **lbl)

            assert moved("og_worker_requests_total", **labels, outcome="result") == 5
            assert moved("og_worker_requests_total", **labels, outcome="unknown_model") == 2
            assert moved("og_worker_end_to_end_seconds_count", model="demo-mlp") == 7
            assert moved("og_worker_queue_wait_seconds_count", model="demo-mlp") == 7
            # The two unknown-model requests are refused before the pipeline runs.
            assert moved("og_worker_inference_seconds_count", model="demo-mlp") == 5
            assert moved("og_worker_published_messages_total", kind="reply") == 7
            assert _get(after, "og_worker_in_flight_requests") == 0
            assert _get(after, "og_worker_window_size_requests") == 64
            # No request id ever becomes a label value.
            ids = {r.request_id for r in good + unknown}
            assert not any(v in ids for (_, lbl) in after for _, v in lbl)

            async def lag_reported() -> bool:
                now = await _scrape(node.health)
                lags = [
                    v
                    for (name, lbl), v in now.items()
                    if name == "og_worker_consumer_lag_records" and ("topic", topic) in lbl
                ]
                return bool(lags) and all(v == 0 for v in lags)

            await eventually(lag_reported, timeout_s=15)

            # A redelivered request is counted as a duplicate; a non-JSON message is
            # dead-lettered, and both carry the trace context they came with.
            await send(good[1], ("traceparent", SENT_TRACE.replace("00f0", "11f1").encode()))
            await producer.send_and_wait(
                topic, b"\x00 not json", headers=[("traceparent", SENT_TRACE.encode())]
            )

            async def rest_counted() -> bool:
                now = await _scrape(node.health)
                return (
                    _get(now, "og_worker_requests_total", **labels, outcome="duplicate") == 1
                    and _get(
                        now,
                        "og_worker_requests_total",
                        model="demo-mlp",
                        mode="unknown",
                        outcome="dead_letter",
                    )
                    == 1
                )

            await eventually(rest_counted, timeout_s=30)
            spans = list(node.spans.get_finished_spans())
            consume_spans = [s for s in spans if s.name == "og.consume"]
    finally:
        await producer.stop()

    sent = TraceContext.parse(SENT_TRACE)
    assert sent is not None

    # -- headers: the reply and the settlement record of one request share one traceparent --
    replies = {m.key.decode(): m for m in await read_topic(broker.bootstrap, topics.replies)}
    records = await read_topic(broker.bootstrap, topics.settlement)
    record_trace = {
        json.loads(m.value)["envelope"]["request_id"]: dict(m.headers)["traceparent"]
        for m in records
    }
    assert set(replies) == {r.request_id for r in good + unknown}
    for request in good + unknown:
        context = TraceContext.parse(dict(replies[request.request_id].headers)["traceparent"])
        assert context is not None, "every reply carries a traceparent"
        if request is good[0]:
            assert context.trace_id == sent.trace_id  # carried from the request
            assert context.span_id != sent.span_id  # naming the worker's span
        else:
            assert context.trace_id != sent.trace_id  # a new trace for an untraced request
        if request in good:
            assert record_trace[request.request_id] == context.traceparent.encode()
    assert len({dict(replies[r.request_id].headers)["traceparent"] for r in good}) == 5

    # -- the dead letter carries the trace and matches the AsyncAPI document's schema --------
    (dead,) = await read_topic(broker.bootstrap, topics.dlq)
    dead_trace = TraceContext.parse(dict(dead.headers)["traceparent"])
    assert dead_trace is not None and dead_trace.trace_id == sent.trace_id
    doc = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    jsonschema.validate(json.loads(dead.value), doc["components"]["schemas"]["DeadLetterEntry"])

    # -- spans: consume → infer → publish, parented on the request's trace, no user data -----
    traced = [s for s in consume_spans if format(s.context.trace_id, "032x") == sent.trace_id]
    roots = [s for s in traced if s.attributes and s.attributes.get("og.outcome") == "result"]
    assert len(roots) == 1
    (root,) = roots
    assert root.parent is not None and format(root.parent.span_id, "016x") == sent.span_id
    children = {s.name: s for s in spans if s.parent and s.parent.span_id == root.context.span_id}
    assert set(children) == {"og.infer", "og.publish"}
    assert dict(replies[good[0].request_id].headers)["traceparent"] == (
        f"00-{sent.trace_id}-{format(root.context.span_id, '016x')}-01".encode()
    )
    for span in consume_spans:
        for key, value in (span.attributes or {}).items():
            assert key.startswith(("messaging.", "og.")), key
            assert "0.5" not in str(value)  # no tensor data

    # -- logs: the duplicate's line names its request and its trace --------------------------
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    (duplicate,) = [line for line in lines if line["msg"] == "duplicate request dropped"]
    assert duplicate["request_id"] == good[1].request_id
    assert duplicate["trace_id"] == sent.trace_id
    assert len(duplicate["span_id"]) == 16


async def test_consumer_lag_is_highwater_minus_position(broker: BrokerProcess) -> None:
    ns = "t" + uuid.uuid4().hex[:12]
    await ensure_topics(broker.bootstrap, standard_topics(ns, ["demo-mlp"], request_partitions=1))
    topic = Topics(ns).infer("demo-mlp")
    kafka = ClusterKafka(KafkaSettings(bootstrap_servers=broker.bootstrap))
    producer = kafka.producer()
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"m{i}".encode())
    finally:
        await producer.stop()
    consumer = kafka.consumer(None)
    await consumer.start()
    try:
        tp = PortTopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        assert await consumer.lag([tp]) == {}  # nothing fetched: unknown, not 0
        fetched = 0
        while fetched < 3:
            batch = await consumer.getmany(timeout_ms=1000, max_records=3 - fetched)
            fetched += sum(len(v) for v in batch.values())
        assert await consumer.lag([tp]) == {tp: 7}
    finally:
        await consumer.stop()


async def test_readiness_follows_the_broker(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        with running_broker(log_dir=tmp_path) as own:
            kafka = KafkaSettings(bootstrap_servers=own.bootstrap)
            server = HealthServer(
                ready={"models_loaded": lambda: True, "broker_reachable": kafka_reachable(kafka)}
            )
            await server.start()
            stack.push_async_callback(server.stop)
            async with httpx.AsyncClient(timeout=5) as client:
                ready = await client.get(server.url("/readyz"))
            assert ready.status_code == 200, ready.text
            assert await asyncio.to_thread(check, server.url("/readyz")) == 0
        # Leaving the block stopped the broker (SIGTERM, then SIGKILL after 5 s).
        async with httpx.AsyncClient(timeout=5) as client:
            gone = await client.get(server.url("/readyz"))
            live = await client.get(server.url("/healthz"))
        assert gone.status_code == 503
        assert gone.json()["failed"] == ["broker_reachable"]
        assert live.status_code == 200  # alive, just not ready
        assert await asyncio.to_thread(check, server.url("/readyz")) == 1
