"""SIGKILL loops: on one of two workers, and on the settlement service, while traffic flows.

Both run real ``inference-node`` processes against the run's Tansu broker, serving the demo
ONNX model. What is counted comes from the topics and the ledger themselves, not from the
processes: terminal replies per request id on the reply topic, and ledger rows per
(request id, node id) against the settlement records on the settlement topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

from bench.chaos_support import (
    MODEL,
    Child,
    Progress,
    Row,
    crash_notes,
    fast_kafka,
    group_progress,
    ledger_rows,
    new_namespace,
    produce_paced,
    requests_for,
    settlement_env,
    start_all,
    supervise,
    worker_env,
)
from tests.harness.outcomes import TopicTap, read_all, terminal_replies

__all__ = ["settlement_kill_loop", "worker_kill_loop"]

_REPLY_TIMEOUT_S = 90.0
_RNG = random.Random(0x5EED)


def _jitter(interval_s: float) -> float:
    """``interval_s`` +-50%, from a seeded generator: kills must not phase-lock with the
    producer's batches or the commit ticks (a fixed interval that is a multiple of both
    lands in the same quiet moment every time)."""
    return interval_s * _RNG.uniform(0.5, 1.5)


_FAILPOINT = {"OG_FAILPOINT": "after_ledger_write"}


def _ledger_progress(ledger: Path) -> Progress:
    """``supervise``'s progress for settlement (and the worker beside it): the ledger."""

    async def rows() -> object:
        return ledger_rows(ledger)

    return rows


async def _wait_answered(tap: TopicTap, ids: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ids <= terminal_replies(tap.messages).keys():
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # late duplicates (a redelivery in flight) arrive now


def _reply_counts(messages: list[Any], ids: set[str]) -> dict[str, Any]:
    replies = terminal_replies(messages)
    answered = ids & replies.keys()
    dup_ids = [rid for rid in answered if len(replies[rid]) > 1]
    disagree = sum(
        1
        for rid in dup_ids
        if len({json.dumps(r.get("envelope", {}).get("output_hash")) for r in replies[rid]}) > 1
    )
    return {
        "answered": len(answered),
        "lost": len(ids - answered),
        "duplicates": len(dup_ids),
        "extra_copies": sum(len(replies[rid]) - 1 for rid in dup_ids),
        "disagreeing_duplicates": disagree,
        "error_replies": sum(1 for rid in answered if replies[rid][0].get("type") == "error"),
    }


async def worker_kill_loop(
    bootstrap: str, hub: Path, work: Path, *, requests: int, rate_per_s: float, kill_every_s: float
) -> Row:
    """Two workers in one group; every ``kill_every_s`` one of them is SIGKILLed and started
    again at once, while ``requests`` requests arrive at ``rate_per_s``. The victim is a worker
    that owns partitions (the one with more, alternating on a tie): killing one that is still
    starting or waiting for its assignment would test nothing."""
    topics = await new_namespace(bootstrap, "ck")
    kafka = fast_kafka(bootstrap)
    run = work / topics.namespace
    workers = [
        Child("worker", f"worker-{i}", worker_env(bootstrap, topics, hub, run / f"node-{i}"), run)
        for i in range(2)
    ]
    batch = requests_for(topics, requests)
    ids = {r.request_id for r in batch}
    kills = idle_ticks = 0
    loops: list[str] = []
    topic = topics.infer(MODEL)
    kill_log: list[tuple[int, str]] = []
    started = time.monotonic()
    await start_all(workers)
    async with TopicTap(kafka, topics.replies) as tap:
        supervisor = asyncio.create_task(
            supervise(
                workers,
                progress=group_progress(bootstrap, f"{topics.namespace}-workers", topic),
                loops=loops,
            )
        )
        producing = asyncio.create_task(produce_paced(kafka, topics, batch, rate_per_s))
        try:
            while not (await asyncio.wait({producing}, timeout=_jitter(kill_every_s)))[0]:
                owners = sorted(workers, key=lambda w: (-w.assigned(), w is workers[kills % 2]))
                victim = owners[0]
                if victim.assigned() == 0:
                    idle_ticks += 1  # nobody owns anything yet (a rebalance): try later
                    continue
                victim.sigkill()
                kill_log.append((time.time_ns() // 1_000_000, victim.node_id))
                victim.start()
                kills += 1
            await producing
            await _wait_answered(tap, ids, _REPLY_TIMEOUT_S)
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            for w in workers:
                await w.terminate(20)
        counts = _reply_counts(tap.messages, ids)
        busy = _kills_while_answering(tap.messages, kill_log)
    dlq = await read_all(kafka, topics.dlq, idle_s=0.5)
    return Row(
        "worker SIGKILL loop (2 workers)",
        sent=requests,
        answered=counts["answered"],
        lost=counts["lost"],
        duplicates=counts["duplicates"],
        dlq=len(dlq),
        crashes=sum(len(w.crashes) for w in workers),
        crash_loops=len(loops),
        notes={
            "sigkills": kills,
            "ticks_without_a_partition_owner": idle_ticks,
            "kills_within_100_ms_of_a_victim_answer": busy,
            "kill_every_s": kill_every_s,
            "rate_per_s": rate_per_s,
            "extra_copies": counts["extra_copies"],
            "disagreeing_duplicates": counts["disagreeing_duplicates"],
            "error_replies": counts["error_replies"],
            "crash_details": crash_notes(workers),
            "wall_s": round(time.monotonic() - started, 1),
        },
    )


async def settlement_kill_loop(
    bootstrap: str, hub: Path, work: Path, *, requests: int, rate_per_s: float, kill_every_s: float
) -> Row:
    """One worker answers ``requests`` (so real, registered records flow) while the settlement
    service is SIGKILLed and restarted every ``kill_every_s``; every third restart arms the
    ``after_ledger_write`` failpoint, so that instance dies between its ledger transaction and
    its offset commit, the worst moment."""
    topics = await new_namespace(bootstrap, "cs")
    kafka = fast_kafka(bootstrap)
    run = work / topics.namespace
    ledger = run / "ledger.sqlite3"
    worker = Child("worker", "worker", worker_env(bootstrap, topics, hub, run / "node"), run)
    settlement = Child("settlement", "settlement", settlement_env(bootstrap, topics, ledger), run)
    batch = requests_for(topics, requests)
    ids = {r.request_id for r in batch}
    kills = failpoints = 0
    loops: list[str] = []
    started = time.monotonic()
    await start_all([worker, settlement])
    async with TopicTap(kafka, topics.replies) as tap:
        supervisor = asyncio.create_task(
            supervise([worker, settlement], progress=_ledger_progress(ledger), loops=loops)
        )
        producing = asyncio.create_task(produce_paced(kafka, topics, batch, rate_per_s))
        try:
            while not (await asyncio.wait({producing}, timeout=_jitter(kill_every_s)))[0]:
                settlement.sigkill()
                kills += 1
                armed = kills % 3 == 0
                settlement.start(_FAILPOINT if armed else None)
                if armed:
                    # Give it time to join and take a batch: it should die on its own.
                    failpoints += 1
                    await settlement.wait_exit(3 * kill_every_s)
                    settlement.sigkill()  # a no-op when the failpoint fired
                    settlement.start()
            await producing
            await _wait_answered(tap, ids, _REPLY_TIMEOUT_S)
            records = await read_all(kafka, topics.settlement, idle_s=0.5)
            pairs = _record_pairs(records)
            deadline = time.monotonic() + 60
            while not pairs <= ledger_rows(ledger)[0].keys() and time.monotonic() < deadline:
                if not settlement.running():
                    settlement.start()
                await asyncio.sleep(0.3)
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            for child in (settlement, worker):
                await child.terminate(20)
        counts = _reply_counts(tap.messages, ids)
    rows, rejected = ledger_rows(ledger)
    stored = pairs & rows.keys()
    return Row(
        "settlement SIGKILL loop (SQLite ledger)",
        sent=len(pairs),
        answered=len(stored),
        lost=len(pairs - rows.keys()),
        duplicates=sum(1 for n in rows.values() if n > 1),
        rejected=rejected,
        crashes=len(worker.crashes) + len(settlement.crashes),
        crash_loops=len(loops),
        notes={
            "sigkills": kills,
            "failpoint_instances": failpoints,
            "failpoint_fired": sum(e.failpoint for e in settlement.exits),
            "kill_every_s": kill_every_s,
            "record_messages": len(records),
            "ledger_rows": sum(rows.values()),
            "rows_without_a_record": len(rows.keys() - pairs),
            "requests_lost": counts["lost"],
            "crash_details": crash_notes([worker, settlement]),
            "wall_s": round(time.monotonic() - started, 1),
        },
    )


def _kills_while_answering(messages: list[Any], kills: list[tuple[int, str]]) -> int:
    """Kills that landed within 100 ms after the victim published an answer: its commit
    (every 100 ms) may not have covered it, so the next owner may answer it again."""
    answered: list[tuple[int, str]] = []
    for m in messages:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            answered.append((m.timestamp, json.loads(m.value)["envelope"]["node_id"]))
    return sum(
        any(node == victim and 0 <= at - ts <= 100 for ts, node in answered) for at, victim in kills
    )


def _record_pairs(messages: list[Any]) -> set[tuple[str, str]]:
    pairs = set()
    for m in messages:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            envelope = json.loads(m.value)["envelope"]
            pairs.add((envelope["request_id"], envelope["node_id"]))
    return pairs
