"""The fuzzer: generated hostile records through the real intake (issue 17, "No single message
stops a worker").

``tests.harness.hostile`` generates records a hostile or careless producer may write: any
bytes, tombstones, invalid UTF-8, huge and deeply nested JSON, valid requests of each kind
and valid requests with one field mutated to an arbitrary value, with arbitrary keys and
headers (``og-attempts`` and ``traceparent`` among them, null and binary values), and records
no client can read. ``tests.harness.hostile_node`` runs each batch through the intake as the
worker wires it (a real ``Pipeline``: the demo ONNX model, a scripted chat model, a signer and
an X25519 key), and ``tests.harness.hostile_check`` says what was owed and what happened.

Every batch must leave: the intake serving (never fatal, no task dead, a valid request sent
afterwards answered), each record with exactly one terminal reply or exactly one DLQ entry (or
dropped as a copy of a request id being answered), offsets committed to the end, one
settlement record per result, and the canary planted in user data in no reply, DLQ entry or
log line.

In memory, hypothesis explores (``HYPOTHESIS_PROFILE=chaos`` for many more examples; each
example also draws whether the cluster auto-creates topics and the producer's size limit).
A fixed-seed sample of the same records runs in memory and on Tansu (``kafka`` marker).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from infra.kafka.memory import MemoryKafka
from schemas.topics import Topics
from tests.harness.hostile import CHAT_MODEL, ML_MODEL, fuzz_settings, hostile_batches, sample
from tests.harness.hostile_node import HostileRun, load_demo_mlp, node_context, run_hostile
from tests.harness.kafka_env import KafkaEnv, MemoryEnv
from tests.harness.pipeline import ScriptedEngine
from worker.engines.base import Engine

SAMPLE_SEED = 17
SAMPLE_SIZE = 40


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-model-cache")


async def _engines(demo_hub: Path, model_cache: Path) -> Mapping[str, Engine]:
    return {
        ML_MODEL: await load_demo_mlp(demo_hub, model_cache),
        CHAT_MODEL: ScriptedEngine(name=CHAT_MODEL),
    }


def _explain(run: HostileRun) -> str:
    lines = [*run.problems, "records:"]
    lines += [f"  {s.topic}/{s.partition}/{s.offset}: {s.record!r}" for s in run.sent]
    return "\n".join(lines)


@fuzz_settings()
@given(data=st.data())
def test_no_generated_record_stops_the_intake_or_goes_unanswered(
    data: st.DataObject, demo_hub: Path, model_cache: Path
) -> None:
    ctx = node_context(Topics("fz"), run_id="fz")
    records = data.draw(hostile_batches(ctx), label="records")
    auto_create = data.draw(st.booleans(), label="auto_create_topics")
    limit = data.draw(st.sampled_from([1_048_576, 65_536]), label="max_message_bytes")

    async def scenario() -> HostileRun:
        env = MemoryEnv()
        env.kafka = MemoryKafka(auto_create_topics=auto_create, max_message_bytes=limit)
        engines = await _engines(demo_hub, model_cache)
        try:
            return await run_hostile(env, ctx, records, engines)
        finally:
            for engine in engines.values():
                await engine.close()

    run = asyncio.run(scenario())
    assert not run.problems, _explain(run)
    for record in records:  # hypothesis --hypothesis-show-statistics lists them
        event(f"record: {record.kind.split('+')[0]}")
    for outcome in run.verdict.outcomes:
        event(f"outcome: {outcome}")


async def test_a_fixed_seed_sample_is_answered_on_each_backend(
    kafka: KafkaEnv, demo_hub: Path, model_cache: Path
) -> None:
    ctx = node_context(Topics("t" + uuid.uuid4().hex[:12]))
    records = sample(ctx, SAMPLE_SIZE, seed=SAMPLE_SEED)
    assert len(records) == SAMPLE_SIZE
    engines = await _engines(demo_hub, model_cache)
    try:
        run = await run_hostile(kafka, ctx, records, engines)
    finally:
        for engine in engines.values():
            await engine.close()
    assert not run.problems, _explain(run)
    assert run.verdict.answered > 0 and run.verdict.dead_lettered > 0, run.verdict.summary()
