"""Hostile records against real worker processes, with crash loops counted.

The records are the fuzzer's (``tests.harness.hostile.sample``: a fixed number drawn with a
fixed seed, all aimed at the served model's request topic) followed by the request-shaped
cases of the hand-written corpus (``tests.harness.corpus``), produced to a Tansu broker that
two ``inference-node worker`` processes consume as one group. A worker that exits on its own is
restarted, as an orchestrator would; a worker that exits again before the group's committed
offsets moved is a *crash loop* (``bench.chaos_support.supervise``).

What the records were owed and what they got is judged from the topics by
``tests.harness.hostile_check.check``, as in the in-memory fuzz test: one terminal answer or
one dead letter each (copies of one request id may share one), offsets committed to the end,
one settlement record per result, and the canary in no reply, DLQ entry or worker log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path

from bench.chaos_support import (
    MODEL,
    Child,
    Row,
    crash_notes,
    group_progress,
    new_namespace,
    start_all,
    supervise,
    worker_env,
)
from infra.kafka.ports import TopicPartition
from schemas.sealing import NodeSealer
from tests.harness.corpus import CorpusContext, hostile_corpus
from tests.harness.hostile import CANARY, FuzzContext, HostileRecord, sample
from tests.harness.hostile_check import Sent, check, reply_topics
from tests.harness.hostile_node import produce, read_back, stop_quietly
from tests.harness.kafka_env import TansuEnv, wait_until
from worker.trust.keys import load_or_create_seed

__all__ = ["fuzz_scenario"]

_WORKERS = 2


def _corpus_records(ctx: CorpusContext) -> list[HostileRecord]:
    return [
        HostileRecord(
            f"corpus:{case.name}",
            MODEL,
            case.raw,
            key=(case.expected.request_id or case.name).encode(),
        )
        for case in hostile_corpus(ctx)
        if case.expected.target == "request"
    ]


async def _committed_to_end(env: TansuEnv, group: str, sent: list[Sent]) -> bool:
    ends: dict[int, int] = {}
    for s in sent:
        ends[s.partition] = max(ends.get(s.partition, 0), s.offset + 1)
    consumer = env.kafka.consumer(group)
    await consumer.start()
    try:
        for partition, end in ends.items():
            committed = await consumer.committed(TopicPartition(sent[0].topic, partition))
            if (committed or 0) < end:
                return False
        return True
    finally:
        await stop_quietly(consumer)


async def fuzz_scenario(
    bootstrap: str,
    hub: Path,
    work: Path,
    *,
    records: int,
    seed: int,
    timeout_s: float,
    corpus: bool = True,
) -> Row:
    topics = await new_namespace(bootstrap, "cf")
    run = work / topics.namespace
    group = f"{topics.namespace}-workers"
    workers = [
        Child("worker", f"worker-{i}", worker_env(bootstrap, topics, hub, run / f"node-{i}"), run)
        for i in range(_WORKERS)
    ]
    started = time.monotonic()
    await start_all(workers)
    keys = run / "node-0" / "keys"
    sealer_hex = NodeSealer(load_or_create_seed(keys / "node_x25519.key")).public_key_hex
    ctx = FuzzContext(topics, sealer_hex)
    hostile = [dataclasses.replace(r, model=MODEL) for r in sample(ctx, records, seed)]
    if corpus:
        hostile += _corpus_records(CorpusContext(topics, sealer_hex, model=MODEL))
    env = TansuEnv(bootstrap)
    loops: list[str] = []
    topic = topics.infer(MODEL)
    supervisor = asyncio.create_task(
        supervise(
            workers, max_restarts=5, progress=group_progress(bootstrap, group, topic), loops=loops
        )
    )
    try:
        sent = await produce(env, topics, hostile)
        with contextlib.suppress(AssertionError):  # not in time: reported below
            await wait_until(
                lambda: _committed_to_end(env, group, sent),
                timeout_s=timeout_s,
                interval_s=0.5,
            )
        committed = await _committed_to_end(env, group, sent)
        await asyncio.sleep(1.0)  # late duplicates
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        for worker in workers:
            await worker.terminate(20)
    replies = [r for name in reply_topics(topics, sent) for r in await read_back(env, name)]
    dlq = await read_back(env, topics.dlq)
    settlement = await read_back(env, topics.settlement)
    logs = [
        line.decode(errors="replace")
        for p in sorted(run.glob("*.log"))
        for line in p.read_bytes().splitlines()
    ]
    verdict = check(sent, replies, dlq, settlement, logs)
    problems = list(verdict.problems)
    if not committed:
        problems.append("offsets were not committed to the end in time")
    return Row(
        "fuzzed + hand-written hostile records (2 workers)",
        sent=len(sent),
        answered=verdict.answered,
        lost=verdict.lost,
        duplicates=verdict.answered_twice,
        dlq=verdict.dead_lettered,
        crashes=sum(len(w.crashes) for w in workers),
        crash_loops=len(loops),
        notes={
            "generated_records": records,
            "seed": seed,
            "corpus_records": len(hostile) - records,
            "canary": CANARY,
            "committed_to_end": committed,
            "copies_dropped_as_duplicates": verdict.duplicates,
            "problems": problems[:20],
            "outcomes": dict(sorted(verdict.outcomes.items())),
            "crash_loop_exits": loops,
            "crash_details": crash_notes(workers),
            "wall_s": round(time.monotonic() - started, 1),
        },
    )
