"""One test per record that used to stop a worker (issue 17), each through the real intake.

Every scenario runs ``tests.harness.hostile_node.run_hostile`` on the in-memory cluster: the
record goes to a request topic, the intake wired as the worker wires it (demo ONNX model,
scripted chat model, signer, sealer) handles it, and a valid request sent afterwards must be
answered. ``run.problems`` collects what must never happen (the intake stopping, a task dying,
offsets left uncommitted, a record without its one answer or dead letter, a settlement record
without a result, the canary in clear); each test adds what its trigger specifically owes.
Triggers that need a real broker are in ``tests/integration/test_unreadable_records.py`` and
``tests/contract/test_kafka_ports.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from infra.kafka.memory import MemoryKafka
from infra.kafka.ports import UnknownTopic
from schemas.dlq import DlqEntry
from schemas.signing import ChainSigner, Signer
from schemas.topics import HEADER_ATTEMPTS, Topics
from tests.harness.hostile import (
    CHAT_MODEL,
    ML_MODEL,
    FuzzContext,
    HostileRecord,
    ml_payload,
    request_doc,
)
from tests.harness.hostile_node import HostileRun, load_demo_mlp, node_context, run_hostile
from tests.harness.kafka_env import MemoryEnv
from tests.harness.pipeline import ScriptedEngine
from tests.harness.stuck_consumer import StuckConsumer
from worker.app import compose_intake
from worker.handler import attempts
from worker.intake import IntakeConfig
from worker.pipeline import Pipeline

Run = Callable[..., Awaitable[HostileRun]]
SEED = b"\x0d" * 32


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("intake-model-cache")


@pytest.fixture
def ctx() -> FuzzContext:
    return node_context(Topics("it"), run_id="it")


@pytest.fixture
async def run(demo_hub: Path, model_cache: Path, ctx: FuzzContext) -> AsyncIterator[Run]:
    """``run(records, kafka=MemoryKafka(), prepare=None)``: the run, asserted free of
    problems."""
    engine = await load_demo_mlp(demo_hub, model_cache)

    async def go(
        records: list[HostileRecord],
        kafka: MemoryKafka | None = None,
        prepare: Callable[[], object] | None = None,
    ) -> HostileRun:
        env = MemoryEnv()
        env.kafka = kafka or MemoryKafka()
        engines = {ML_MODEL: engine, CHAT_MODEL: ScriptedEngine(name=CHAT_MODEL)}
        result = await run_hostile(env, ctx, records, engines, prepare=prepare)
        assert not result.problems, result.problems
        return result

    try:
        yield go
    finally:
        await engine.close()


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def _dead_letters(run: HostileRun) -> list[DlqEntry]:
    return [DlqEntry.model_validate_json(m.value or b"") for m in run.dlq]


def _replies(run: HostileRun) -> list[tuple[str, dict[str, Any]]]:
    return [(m.topic, json.loads(m.value or b"")) for m in run.replies]


# -- headers ------------------------------------------------------------------------------------


async def test_a_null_og_attempts_header_is_dead_lettered_as_a_first_attempt(run: Run) -> None:
    # Was: TypeError on len(None) while dead-lettering, the worker stopped, and restarted
    # on the same record (a crash loop).
    record = HostileRecord("garbage", ML_MODEL, b"not json", headers=((HEADER_ATTEMPTS, None),))
    result = await run([record])
    (entry,) = _dead_letters(result)
    assert entry.reason == "not UTF-8 JSON" and entry.attempts == 1
    assert attempts([(HEADER_ATTEMPTS, None)]) == 0


async def test_an_og_attempts_header_at_its_cap_is_dead_lettered_not_fatal(run: Run) -> None:
    # Found by the fuzzer: a count of 1,000,000 (or more) plus this attempt made a DLQ entry
    # its own schema refuses; publishing the dead letter failed and the worker stopped.
    records = [
        HostileRecord("garbage", ML_MODEL, b"[]", headers=((HEADER_ATTEMPTS, count),))
        for count in (b"999999", b"1000000", b"9999999")
    ]
    result = await run(records)
    assert sorted(e.attempts for e in _dead_letters(result)) == [1_000_000] * 3


async def test_a_header_key_that_is_not_utf8_is_dead_lettered_between_answered_neighbours(
    run: Run, ctx: FuzzContext
) -> None:
    # The consumer delivers such a record as an ``UnreadableRecord`` (aiokafka raises on it:
    # tests/integration/test_unreadable_records.py); the intake dead-letters it in place.
    records = [
        HostileRecord("ml", ML_MODEL, _json(request_doc(ctx, "it-1")), key=b"k"),
        HostileRecord("unreadable", ML_MODEL, None, unreadable=True),
        HostileRecord("ml", ML_MODEL, _json(request_doc(ctx, "it-2")), key=b"k"),
    ]
    result = await run(records)
    (entry,) = _dead_letters(result)
    assert entry.reason == "header key not UTF-8" and entry.sealed_payload_hex is not None
    assert sorted(doc["request_id"] for _, doc in _replies(result)) == ["it-1", "it-2"]


# -- ids and topics ending in a newline -----------------------------------------------------------


async def test_a_request_id_ending_in_a_newline_is_not_salvaged_but_dead_lettered(
    run: Run, ctx: FuzzContext
) -> None:
    # Python's ``$`` matches before a final newline, pydantic's patterns do not: the id was
    # salvaged for an error reply that could then not be built, and the record never answered.
    doc = request_doc(ctx, "it-3\n", model=5)
    result = await run([HostileRecord("id+newline", ML_MODEL, _json(doc))])
    (entry,) = _dead_letters(result)
    assert entry.reason.startswith("invalid message")
    assert result.replies == []


async def test_a_reply_to_ending_in_a_newline_is_not_used_the_error_goes_to_the_shared_topic(
    run: Run, ctx: FuzzContext
) -> None:
    doc = request_doc(ctx, "it-4", reply_to=ctx.client_topic + "\n")
    result = await run([HostileRecord("reply_to+newline", ML_MODEL, _json(doc))])
    [(topic, reply)] = _replies(result)
    assert topic == ctx.topics.replies
    assert (reply["request_id"], reply["code"]) == ("it-4", "bad_request")


# -- replies the cluster refuses ------------------------------------------------------------------


async def test_an_output_over_the_producers_limit_is_answered_output_too_large_unbooked(
    run: Run, ctx: FuzzContext
) -> None:
    # 2,000 rows in, 6,000 probabilities out: over a 64 KiB producer limit.
    doc = request_doc(ctx, "it-5", payload=ml_payload(rows=2000))
    result = await run(
        [HostileRecord("ml", ML_MODEL, _json(doc))], kafka=MemoryKafka(max_message_bytes=65_536)
    )
    [(_, reply)] = _replies(result)
    assert (reply["request_id"], reply["code"]) == ("it-5", "output_too_large")
    assert result.settlement == []


async def test_a_reply_topic_that_does_not_exist_without_auto_create_stops_nothing(
    run: Run, ctx: FuzzContext
) -> None:
    # Was: the broker refused the reply past the retry budget and the worker stopped; on
    # restart it refused it again (a crash loop).
    doc = request_doc(ctx, "it-6", reply_to=ctx.client_topic)
    result = await run(
        [HostileRecord("ml", ML_MODEL, _json(doc))], kafka=MemoryKafka(auto_create_topics=False)
    )
    assert result.settlement == []  # no result booked for a reply nobody could receive
    for entry in _dead_letters(result):
        assert entry.reason == "the reply topic does not exist"


async def test_a_refused_reply_is_dead_lettered_and_its_result_never_booked(
    run: Run, ctx: FuzzContext
) -> None:
    # Found by the fuzzer: reply and settlement record were sent together, so the record was
    # booked although the reply was refused (and the request dead-lettered).
    kafka = MemoryKafka()
    doc = request_doc(ctx, "it-7", reply_to=ctx.client_topic)
    result = await run(
        [HostileRecord("ml", ML_MODEL, _json(doc))],
        kafka=kafka,
        prepare=lambda: kafka.fail_sends(1, UnknownTopic(ctx.client_topic)),
    )
    (entry,) = _dead_letters(result)
    assert entry.reason == "the reply topic does not exist"
    assert result.replies == [] and result.settlement == []


async def test_a_dead_letter_fits_the_producers_limit_however_large_the_original(
    run: Run,
) -> None:
    # Found by the fuzzer: with a 64 KiB producer limit (the lowest the settings allow) a
    # 60 KB original, sealed and hex-encoded into its DLQ entry, was too large to publish,
    # and the worker stopped on it at every restart.
    original = b"\xff" + b"x" * 60_000
    result = await run(
        [HostileRecord("binary", ML_MODEL, original)], kafka=MemoryKafka(max_message_bytes=65_536)
    )
    (entry,) = _dead_letters(result)
    assert entry.size_bytes == len(original) and entry.sealed_payload_hex is None
    small = await run([HostileRecord("binary", ML_MODEL, b"\xff" + b"x" * 1_000)])
    assert _dead_letters(small)[0].sealed_payload_hex is not None


# -- supervised background tasks -----------------------------------------------------------------


async def test_a_commit_loop_that_dies_fails_readiness_and_stops_the_worker_non_zero(
    ctx: FuzzContext, tmp_path: Path
) -> None:
    from worker.app import Worker, WorkerFatal
    from worker.settings import WorkerSettings

    kafka = MemoryKafka()
    group = "it-workers"
    consumer = StuckConsumer(kafka.consumer(group))
    consumer.stick("commit", "bug")  # not a Kafka error: nothing in the loop catches it
    producer = kafka.producer()
    await producer.start()
    doc = request_doc(ctx, "it-8", CHAT_MODEL, {"kind": "chat", "messages": [_HELLO]})
    await producer.send_and_wait(ctx.topics.infer(CHAT_MODEL), _json(doc), key=b"it-8")
    engines = {CHAT_MODEL: ScriptedEngine(name=CHAT_MODEL)}
    pipeline = Pipeline(engines, Signer(SEED), ChainSigner(SEED), retries=0)
    intake = compose_intake(
        consumer,
        producer,
        pipeline,
        ctx.topics,
        IntakeConfig(commit_interval_s=0.01, drain_timeout_s=1.0),
        dlq_key=PrivateKey.generate().public_key,
    )
    consumer.subscribe([ctx.topics.infer(CHAT_MODEL)], intake.rebalance_listener())
    await consumer.start()
    worker = Worker(WorkerSettings(key_dir=tmp_path / "keys"), kafka=kafka)
    worker.intake = intake  # run() as the worker runs it, on this intake
    try:
        async with asyncio.timeout(10):
            with pytest.raises(WorkerFatal):  # the CLI exits 1 on it
                await worker.run()
    finally:
        await consumer.stop()
        await producer.stop()
    assert not intake.healthy  # what the "background_tasks" readiness check reads
    assert intake.fatal is not None and "intake-commit" in str(intake.fatal)


_HELLO = {"role": "user", "content": "hello"}
