"""Hostile records (``tests.harness.hostile``) through a real intake on any ``KafkaEnv``.

``run_hostile`` produces the records to the request topics (an unreadable one through the
backend's own way of writing a record no client can read), runs the intake exactly as the
worker wires it (``worker.app.compose_intake``, a real ``Pipeline`` with a signer and an X25519
key for sealed requests) until every offset is committed, then sends one valid request and
waits for its result (the node still serves), stops the intake as the worker does and reads
back every topic. The verdict is ``tests.harness.hostile_check.check``'s, plus what only the
process can tell: the intake never went fatal, no task died with an unretrieved exception, and
``run()`` returned within its shutdown bound (``worker.intake``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from infra.kafka.client import ClusterKafka
from infra.kafka.memory import MemoryKafka
from infra.kafka.ports import Consumer, Record, TopicPartition, UnknownTopic
from infra.logs import ContextFilter, JsonFormatter
from schemas.codec import encode
from schemas.requests import InferenceRequest, MLInput, Tensor
from schemas.sealing import NodeSealer
from schemas.signing import ChainSigner, Signer
from schemas.topics import Topics, standard_topics
from tests.harness.hostile import CHAT_MODEL, ML_MODEL, FuzzContext, HostileRecord
from tests.harness.hostile_check import Sent, Verdict, check, reply_topics
from tests.harness.kafka_env import KafkaEnv, TansuEnv
from tests.harness.unreadable import produce_unreadable
from worker.app import compose_intake
from worker.engines.base import Engine
from worker.intake import IntakeConfig
from worker.pipeline import Pipeline

__all__ = [
    "HostileRun",
    "load_demo_mlp",
    "node_context",
    "produce",
    "read_back",
    "run_hostile",
    "stop_quietly",
]

_SEALER_SEED = b"\x0b" * 32
_SIGNER_SEED = b"\x0c" * 32
_PRODUCE_LIMIT_BYTES = 4_000_000
_OUR_LOGGERS = ("worker", "infra", "schemas", "settlement", "client")


def node_context(topics: Topics, **fields: Any) -> FuzzContext:
    """A ``FuzzContext`` whose sealed requests open on the node ``run_hostile`` runs."""
    return FuzzContext(topics, NodeSealer(_SEALER_SEED).public_key_hex, **fields)


async def load_demo_mlp(hub: Path, cache_dir: Path) -> Engine:
    """The demo ONNX model from a demo hub (``infra.dev.demo_models``)."""
    from worker.engines import load_engine
    from worker.modelstore.local_hub import LocalHub

    local = LocalHub(hub)
    ref = local.resolve(ML_MODEL)
    return await load_engine(ref, local.materialize(ref, cache_dir))


@dataclass
class HostileRun:
    verdict: Verdict
    sent: list[Sent]
    fatal: BaseException | None
    task_errors: list[str]
    """Exceptions of tasks nobody retrieved (a handler bug that escaped)."""
    still_serving: bool
    """A valid request sent after the batch was answered with a result."""
    commits_behind: dict[str, tuple[int | None, int]]
    """Partitions whose committed offset fell short of the end: (committed, end)."""
    stop_s: float
    """How long ``run()`` took to return after ``stop()``."""
    stop_bound_s: float
    """The most it may take (``worker.intake``: drain, cancelled tasks' grace, final commit)."""
    logs: list[str] = field(default_factory=list)
    replies: list[Record] = field(default_factory=list)
    """Every message on the reply topics for the batch (the request sent after it left out)."""
    dlq: list[Record] = field(default_factory=list)
    settlement: list[Record] = field(default_factory=list)
    """Settlement records of the batch (the request sent after it left out)."""

    @property
    def problems(self) -> list[str]:
        out = list(self.verdict.problems)
        if self.verdict.lost:
            out.append(f"{self.verdict.lost} record(s) lost")
        if self.fatal is not None:
            out.append(f"the intake stopped: {type(self.fatal).__name__}: {self.fatal}")
        out += [f"task died: {e}" for e in self.task_errors]
        if self.commits_behind:
            out.append(f"offsets not committed to the end: {self.commits_behind}")
        if not self.still_serving:
            out.append("a valid request sent after the batch got no result")
        if self.stop_s > self.stop_bound_s:
            out.append(f"run() took {self.stop_s:.1f} s to return, over {self.stop_bound_s} s")
        return out


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every line our packages log meanwhile, formatted as the services write them."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name.startswith(_OUR_LOGGERS):
                lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def task_errors() -> Iterator[list[str]]:
    """Errors the event loop reports for tasks nobody awaited (instead of printing them)."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    previous = loop.get_exception_handler()

    def handle(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        errors.append(f"{context.get('message')}: {type(error).__name__ if error else ''}")

    loop.set_exception_handler(handle)
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def produce(env: KafkaEnv, topics: Topics, records: Sequence[HostileRecord]) -> list[Sent]:
    """Produce ``records`` in order, each acknowledged, to their model's request topic; a
    producer with a large size limit, so oversized values reach the topic as a hostile client
    would write them (the worker's own producer keeps the backend's limit)."""
    sent: list[Sent] = []
    if isinstance(env.kafka, MemoryKafka):
        kafka = env.kafka
        limit, kafka.max_message_bytes = kafka.max_message_bytes, _PRODUCE_LIMIT_BYTES
        producer = kafka.producer()
    else:
        assert isinstance(env, TansuEnv)
        big = env.settings.model_copy(update={"max_request_size_bytes": _PRODUCE_LIMIT_BYTES})
        producer = ClusterKafka(big).producer()
    await producer.start()
    try:
        for i, record in enumerate(records):
            topic = topics.infer(record.model)
            if record.unreadable:
                partition = i % 2
                if isinstance(env.kafka, MemoryKafka):
                    offset = env.kafka.append_unreadable(topic, partition, "header key not UTF-8")
                else:
                    assert isinstance(env, TansuEnv)
                    bootstrap = env.settings.bootstrap_servers
                    offset = await produce_unreadable(bootstrap, topic, partition, b"unreadable")
                sent.append(Sent(record, topic, partition, offset))
                continue
            key = record.key if record.key is not None or record.value is not None else b"k"
            ack = await producer.send(topic, record.value, key=key, headers=record.headers)
            meta: Any = await ack
            sent.append(Sent(record, topic, int(meta.partition), int(meta.offset)))
    finally:
        await producer.stop()
        if isinstance(env.kafka, MemoryKafka):
            env.kafka.max_message_bytes = limit
    return sent


def _good_request(topics: Topics, run_id: str) -> InferenceRequest:
    x = Tensor(dtype="float32", shape=[1, 4], data=[1.0, 2.0, 3.0, 4.0])
    return InferenceRequest.model_validate(
        {
            "request_id": f"{run_id}-good-after-the-batch",
            "model": ML_MODEL,
            "reply_to": topics.replies,
            "created_unix_ms": time.time_ns() // 1_000_000,
            "payload": MLInput(tensors={"x": x}),
        }
    )


def _ends(sent: Sequence[Sent]) -> dict[tuple[str, int], int]:
    ends: dict[tuple[str, int], int] = {}
    for s in sent:
        ends[(s.topic, s.partition)] = max(ends.get((s.topic, s.partition), 0), s.offset + 1)
    return ends


async def _behind(
    env: KafkaEnv, group: str, ends: Mapping[tuple[str, int], int]
) -> dict[str, tuple[int | None, int]]:
    """Partitions whose committed offset is short of the end: "topic/p" -> (committed, end)."""
    behind = {}
    consumer = env.kafka.consumer(group)
    await consumer.start()
    try:
        for (topic, partition), end in ends.items():
            committed = await consumer.committed(TopicPartition(topic, partition))
            if (committed or 0) < end:
                behind[f"{topic}/{partition}"] = (committed, end)
    finally:
        await stop_quietly(consumer)
    return behind


async def _committed(env: KafkaEnv, group: str, ends: Mapping[tuple[str, int], int]) -> bool:
    return not await _behind(env, group, ends)


async def run_hostile(
    env: KafkaEnv,
    ctx: FuzzContext,
    records: Sequence[HostileRecord],
    engines: Mapping[str, Engine],
    *,
    config: IntakeConfig | None = None,
    prepare: Callable[[], object] | None = None,
) -> HostileRun:
    """See the module docstring. ``engines`` serve ``demo-mlp`` and ``demo-lm`` in the new
    namespace ``ctx.topics`` (request topics of two partitions). ``prepare`` runs once the
    records are on their topics, before the intake starts."""
    topics = ctx.topics
    await env.create_topics(
        standard_topics(topics.namespace, [ML_MODEL, CHAT_MODEL], request_partitions=2)
    )
    config = config or IntakeConfig(
        commit_interval_s=env.commit_interval_s,
        drain_timeout_s=5.0,
        revoke_timeout_s=5.0,
        publish_backoff_s=0.01,
    )
    group = f"{topics.namespace}-workers"
    sent = await produce(env, topics, records)
    if prepare is not None:
        prepare()
    pipeline = Pipeline(
        engines,
        Signer(_SIGNER_SEED),
        ChainSigner(_SIGNER_SEED),
        retries=0,
        sealer=NodeSealer(_SEALER_SEED),
        max_execution_s=5.0,
    )
    consumer, producer = env.kafka.consumer(group), env.kafka.producer()
    await producer.start()
    intake = compose_intake(
        consumer, producer, pipeline, topics, config, dlq_key=PrivateKey.generate().public_key
    )
    consumer.subscribe(
        [topics.infer(m) for m in (ML_MODEL, CHAT_MODEL)], intake.rebalance_listener()
    )
    good = _good_request(topics, ctx.run_id)
    with captured_logs() as logs, task_errors() as errors:
        await consumer.start()
        task = asyncio.create_task(intake.run())
        behind: dict[str, tuple[int | None, int]] = {}
        still_serving = False
        try:
            ends = _ends(sent)
            with contextlib.suppress(AssertionError):  # not within the time: reported below
                await env.wait_until(
                    lambda: task.done() or _committed(env, group, ends), "every offset committed"
                )
            behind = await _behind(env, group, ends)
            if not task.done():
                async with env.producer() as client:
                    await client.send_and_wait(
                        topics.infer(ML_MODEL), encode(good), key=good.request_id.encode()
                    )

                async def answered() -> bool:
                    if task.done():
                        return True
                    return any(
                        good.request_id.encode() in (r.value or b"")
                        and b'"type":"result"' in (r.value or b"")
                        for r in await read_back(env, topics.replies)
                    )

                with contextlib.suppress(AssertionError):
                    await env.wait_until(answered, "the request after the batch answered")
                still_serving = not task.done() and await answered()
        finally:
            intake.stop()
            started = time.monotonic()
            async with asyncio.timeout(config.drain_timeout_s + 10):
                await task
            stop_s = time.monotonic() - started
            await stop_quietly(consumer)
            await producer.stop()
        replies = [r for name in reply_topics(topics, sent) for r in await read_back(env, name)]
        dlq = await read_back(env, topics.dlq)
        settlement = await read_back(env, topics.settlement)
    good_id = good.request_id.encode()
    replies = [r for r in replies if good_id not in (r.value or b"")]
    settlement = [r for r in settlement if good_id not in (r.value or b"")]
    return HostileRun(
        check(sent, replies, dlq, settlement, logs),
        sent,
        intake.fatal,
        list(errors),
        still_serving,
        behind,
        stop_s,
        config.drain_timeout_s + max(1.0, config.drain_timeout_s / 4) + config.commit_timeout_s,
        list(logs),
        replies,
        dlq,
        settlement,
    )


async def read_back(env: KafkaEnv, topic: str) -> list[Record]:
    """Every record of ``topic`` (none when it does not exist), read until nothing new arrives
    for ``env.read_idle_ms``."""
    if isinstance(env.kafka, MemoryKafka):
        try:
            return list(env.kafka.records(topic))
        except UnknownTopic:
            return []
    consumer = env.kafka.consumer(None)
    await consumer.start()
    records: list[Record] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(await consumer.partitions_for(topic))]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(env.timeout_s):
            while batches := await consumer.getmany(timeout_ms=env.read_idle_ms):
                for batch in batches.values():
                    records.extend(batch)
    finally:
        await stop_quietly(consumer)
    return records


async def stop_quietly(consumer: Consumer) -> None:
    """``consumer.stop()``; aiokafka's sometimes raises the ``CancelledError`` of its own
    internal task, which is not ours to propagate (ours is: the task is being cancelled)."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
