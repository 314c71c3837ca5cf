"""One pod, many processes: ``inference-node worker --processes 2`` against ``--processes 1``
(target: 2 processes >= 1.7 x the throughput of one).

Run with ``python -m bench.processes`` (``make bench``; ``--smoke`` for tiny sizes). Per run,
on one real broker: a fresh namespace (4 request partitions), the same N pre-encoded demo-mlp
requests (VANILLA, ``bench.intake.corpus``) produced to its request topic, then
``inference-node worker --processes P`` started as a child process (admitted by the run's
authority, as ``bench.chaos_support.worker_env`` makes it; its P worker processes share the
node's identity and consumer group, so the 4 partitions are spread over them). This process
reads the reply topic as it fills (one consumer, no group, keys counted) until replies to all
N requests are there, then SIGTERMs the pod, which drains and must exit 0; a request answered
twice fails the run (it would stand in for one not yet answered).
Throughput is N-1 over the span of the reply topic's record timestamps (first to last reply),
as in ``bench.intake``, so start-up and the consumer-group join before the first reply are
excluded alike for both sides. The middle 80 % of replies is reported too: it also leaves out
the first replies (the pod's processes start and join the group a few hundred ms apart) and
the tail (the partitions finishing last run alone).

The sides alternate (P=1, then P=2), ``--repeats`` times (default 3, N = 20,000). Reported:
median and min-max per side, the speedup (median of P=2 over median of P=1) and the ratio of
each repetition's pair. The machine's CPU busy fraction (all processes, 0.5 s from /proc/stat)
is recorded before each run. The broker, the pod's processes and this process share the
machine: a second worker process gains only the CPU that the broker and the first leave idle,
so on a machine with few cores the speedup says as much about the machine as about the pod.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.chaos_support import Child, start_all, worker_env
from bench.common import (
    add_run_options,
    cpu_busy,
    demo_hub,
    results_path,
    spread,
    table,
    write_section,
)
from bench.intake import (
    MODEL,
    PARTITIONS,
    Corpus,
    Run,
    bench_kafka,
    corpus,
    measured_run,
    produce_corpus,
    run_namespace,
)
from infra.dev.broker import running_broker
from infra.dev.processes import log_tail
from infra.kafka import KafkaSettings
from schemas import Topics

__all__ = ["SIDES", "TARGET_SPEEDUP", "main"]

SIDES = (1, 2)
"""Worker processes in the pod, one side each."""
TARGET_SPEEDUP = 1.7
GROUP_TIMEOUTS_MS = {"session": 3000, "heartbeat": 500}
"""The pod's consumer-group timeouts; ``--smoke`` shortens them (a join on Tansu takes about
2/3 of the session timeout)."""
ANSWER_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


def _pod(bootstrap: str, topics: Topics, hub: Path, run: Path, processes: int) -> Child:
    """``inference-node worker --processes <processes>``, admitted by the run's authority."""
    env = worker_env(bootstrap, topics, hub, run / "node")
    env["OG_WORKER_KAFKA__SESSION_TIMEOUT_MS"] = str(GROUP_TIMEOUTS_MS["session"])
    env["OG_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS"] = str(GROUP_TIMEOUTS_MS["heartbeat"])
    command = [sys.executable, "-m", "nodecli.main", "worker", "--processes", str(processes)]
    return Child("worker", f"pod-{processes}", env, run, command)


async def _wait_for_replies(kafka: KafkaSettings, topic: str, n: int, pod: Child) -> None:
    """Until ``topic`` holds replies to n distinct requests, read as it fills (from the
    beginning, each record once). Not by end offsets: Tansu's is the last record batch's base
    offset + 1 (the rest of that batch is not counted)."""
    consumer = AIOKafkaConsumer(**kafka.consumer_kwargs(None))
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        answered: set[bytes] = set()
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while len(answered) < n:
            if not pod.running():
                raise RuntimeError(f"the pod stopped early:\n{log_tail(pod.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(answered)}/{n} answered after {ANSWER_TIMEOUT_S:.0f} s")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                answered.update(m.key for m in records)
    finally:
        await consumer.stop()


async def run_pod(bootstrap: str, hub: Path, work: Path, messages: Corpus, processes: int) -> Run:
    """The pod with ``processes`` worker processes over ``messages`` (module docstring)."""
    kafka = bench_kafka(bootstrap)
    topics = await run_namespace(bootstrap, [MODEL], PARTITIONS)
    await produce_corpus(kafka, topics.infer(MODEL), messages)
    pod = _pod(bootstrap, topics, hub, work / topics.namespace, processes)
    await start_all([pod])
    try:
        await _wait_for_replies(kafka, topics.replies, len(messages), pod)
    finally:
        await pod.terminate(STOP_TIMEOUT_S)
    if pod.crashes:
        crash = pod.crashes[0]
        raise RuntimeError(f"the pod exited with status {crash.rc}:\n{crash.tail}")
    run = await measured_run(kafka, topics, len(messages))
    distinct = len({m.key for m in run.replies})
    if distinct < len(messages):
        # A request answered twice (redelivered across a rebalance) stands in for one not yet
        # answered: the span would end early.
        raise RuntimeError(f"{len(messages) - distinct} requests answered twice")
    return run


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


async def measure(bootstrap: str, hub: Path, work: Path, n: int, repeats: int) -> dict[str, Any]:
    messages = corpus(n)
    runs: dict[int, list[Run]] = {p: [] for p in SIDES}
    busy: dict[int, list[float | None]] = {p: [] for p in SIDES}
    for i in range(repeats):
        for p in SIDES:
            busy[p].append(await asyncio.to_thread(cpu_busy))
            runs[p].append(await run_pod(bootstrap, hub, work, messages, p))
        print(
            f"  run {i + 1}/{repeats}: "
            + ", ".join(f"{p} process(es) {runs[p][-1].rps:,.0f} req/s" for p in SIDES),
            flush=True,
        )
    rps = {p: [r.rps for r in rs] for p, rs in runs.items()}
    steady = {p: [r.steady_rps for r in rs] for p, rs in runs.items()}
    med = {p: statistics.median(v) for p, v in rps.items()}
    steady_med = {p: statistics.median(v) for p, v in steady.items()}
    one, two = SIDES
    # JSON object keys are strings: the sides are keyed "1" and "2".
    return {
        "model": MODEL,
        "requests": n,
        "repeats": repeats,
        "partitions": PARTITIONS,
        "cores": os.cpu_count(),
        "cpu_busy_before": {str(p): v for p, v in busy.items()},
        "rps": {str(p): v for p, v in rps.items()},
        "rps_median": {str(p): v for p, v in med.items()},
        "steady_rps": {str(p): v for p, v in steady.items()},
        "steady_rps_median": {str(p): v for p, v in steady_med.items()},
        "span_s": {str(p): [r.span_s for r in rs] for p, rs in runs.items()},
        "speedup": med[two] / med[one],
        "speedup_per_run": _ratios(rps[two], rps[one]),
        "steady_speedup": steady_med[two] / steady_med[one],
        "target_speedup": TARGET_SPEEDUP,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-processes-"))
    try:
        hub = await asyncio.to_thread(demo_hub, work, args.hub)
        with running_broker(log_dir=work) as broker:
            results = await measure(broker.bootstrap, hub, work, args.n, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"smoke": args.smoke, **results}


def print_table(r: dict[str, Any]) -> None:
    print(
        f"\nOne pod, P worker processes: demo-mlp, {r['requests']:,} requests per run, "
        f"{r['partitions']} partitions, {r['repeats']} runs per side, {r['cores']} cores "
        "(req/s, median (min-max))"
    )
    per_run = spread(r["speedup_per_run"], "{:.2f}")
    rows = []
    for p in (str(p) for p in SIDES):
        first = p == str(SIDES[0])
        rows.append(
            [
                p,
                spread(r["rps"][p]),
                spread(r["steady_rps"][p]),
                "-" if first else f"{r['speedup']:.2f} (per run {per_run})",
                "-" if first else f"{r['steady_speedup']:.2f}",
            ]
        )
    print(table(["processes", "req/s", "req/s, middle 80 %", "speedup", "speedup (middle)"], rows))
    busy = [b for side in r["cpu_busy_before"].values() for b in side if b is not None]
    if busy:
        print(f"CPU busy before each run (all processes): {min(busy):.0%}-{max(busy):.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(parser, hub=True)
    parser.add_argument("--n", type=int, default=20_000, help="requests per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeats = 200, 1
        GROUP_TIMEOUTS_MS.update(session=1000, heartbeat=100)
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["runtime_s"] = time.perf_counter() - started
    write_section(
        results_path(args), "processes", results, {"processes_2_speedup": results["speedup"]}
    )
    print_table(results)
    print(f"\nRuntime {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
