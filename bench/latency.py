"""Added latency at 50% of peak throughput (issue #10: p50 <= 5 ms, p99 <= 20 ms).

Run with ``python -m bench.latency``. Method:

1. Peak: N demo-mlp requests are pre-produced to a 4-partition topic, then one
   ``inference-node worker`` process is started; its peak is the reply topic's record
   timestamps, first to last (as in ``bench.intake``, but with the worker out of process, as
   it is measured below). ``--peak-rps`` skips this.
2. Open loop at ``--fraction`` (0.5) of that peak: this process sends requests on a fixed
   schedule, never waiting for replies, and reads the reply topic itself; a request's latency
   is the time from just before its ``send`` to the moment its reply comes out of
   ``getmany`` (one monotonic clock, one process). The first ``--warmup-s`` of each run is
   not counted.
3. The same open loop against the baseline: a raw aiokafka echo process (this module with
   ``--echo``), the loop ``bench.intake`` uses, with the same consumer and producer settings
   as the worker: consume, produce a reply of the worker's average reply size (keyed by the
   request id) and one of its settlement-record size, await both acks, commit each batch.
4. Added latency = worker minus baseline, for p50 and p99 (medians over ``--repeats`` runs of
   each, run alternately so machine noise hits both sides alike).

Steps 2-4 run once per consumer fetch wait in ``--fetch-max-wait-ms`` (worker and baseline
alike). 500 ms is aiokafka's default and what ``infra.kafka.KafkaSettings`` ships. Tansu does
not answer a waiting Fetch when new data arrives (it answers when the wait runs out), so at low
rates this wait, not the worker, sets the floor of end-to-end latency (~140 ms p50 for a bare
echo at 100 req/s; ~9 ms with 10 ms). The 10 ms run shows what the worker itself adds
(``OG_WORKER_KAFKA__FETCH_MAX_WAIT_MS=10``).

Both services run as separate processes on the same broker and machine as the load generator
(on a 2-core machine they compete with it for CPU, which shows in the tails).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.chaos_support import (
    MODEL,
    Child,
    fast_kafka,
    new_namespace,
    requests_for,
    start_all,
    worker_env,
)
from bench.intake import table
from infra.dev.broker import running_broker
from infra.dev.demo_models import build_demo_hub
from schemas import Topics, encode
from tests.harness.outcomes import read_all

RESULTS = Path(__file__).with_name("results.json")
TARGET_P50_MS = 5.0
TARGET_P99_MS = 20.0
_DEFAULT_FETCH_WAIT_MS = 500
"""aiokafka's default ``fetch_max_wait_ms``, which ``infra.kafka.KafkaSettings`` keeps."""
_CLIENT_FETCH_WAIT_MS = 10
"""The load generator's own reply reader: short, so it adds little to either side."""


# -- the baseline echo service (``--echo``) ---------------------------------------------------


async def echo(args: argparse.Namespace) -> None:
    kafka = fast_kafka(args.bootstrap)
    topics = Topics(args.namespace)
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    consumer = AIOKafkaConsumer(
        topics.infer(MODEL),
        **kafka.consumer_kwargs(f"{topics.namespace}-echo"),
        fetch_max_wait_ms=args.fetch_max_wait_ms,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await producer.start()
    await consumer.start()
    reply, record = b"r" * args.reply_bytes, b"s" * args.record_bytes
    args.ready_file.write_text("ready\n")
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=256)
            acks = []
            for records in batches.values():
                for msg in records:
                    acks.append(await producer.send(topics.replies, reply, key=msg.key))
                    acks.append(await producer.send(topics.settlement, record, key=b"node"))
            await asyncio.gather(*acks)
            if batches:
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batches.items()})
    finally:
        await consumer.stop()
        await producer.stop()


def _service(
    side: str,
    bootstrap: str,
    topics: Topics,
    hub: Path,
    run: Path,
    wait_ms: int,
    sizes: tuple[int, int],
) -> Child:
    """The worker (as shipped when ``wait_ms`` is the default 500) or the echo baseline."""
    if side == "worker":
        env = worker_env(bootstrap, topics, hub, run / "node")
        env["OG_WORKER_KAFKA__FETCH_MAX_WAIT_MS"] = str(wait_ms)
        return Child("worker", "worker", env, run)
    command = [
        sys.executable,
        "-m",
        "bench.latency",
        "--echo",
        "--bootstrap",
        bootstrap,
        "--namespace",
        topics.namespace,
        "--reply-bytes",
        str(sizes[0]),
        "--record-bytes",
        str(sizes[1]),
        "--fetch-max-wait-ms",
        str(wait_ms),
    ]
    return Child("echo", "echo", dict(os.environ), run, command)


# -- measuring ----------------------------------------------------------------------------


async def measure_peak(bootstrap: str, hub: Path, work: Path, n: int) -> tuple[float, int, int]:
    """Requests/s of one worker process over n pre-produced requests; and its mean reply and
    settlement-record sizes (for the echo baseline)."""
    topics = await new_namespace(bootstrap, "lp")
    kafka = fast_kafka(bootstrap)
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        for r in requests_for(topics, n):
            await producer.send(topics.infer(MODEL), encode(r), key=r.request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    run = work / topics.namespace
    worker = Child("worker", "worker", worker_env(bootstrap, topics, hub, run / "node"), run)
    await start_all([worker])
    try:
        deadline = time.monotonic() + 120
        replies: list[Any] = []
        while len(replies) < n and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            replies = await read_all(kafka, topics.replies, idle_s=0.3)
        records = await read_all(kafka, topics.settlement, idle_s=0.3)
    finally:
        await worker.terminate(20)
    if len(replies) < n:
        raise RuntimeError(f"peak run: {len(replies)}/{n} replies")
    stamps = sorted(m.timestamp for m in replies)
    rate = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    reply_bytes = int(statistics.mean(len(m.value) for m in replies))
    record_bytes = int(statistics.mean(len(m.value) for m in records)) if records else 700
    return rate, reply_bytes, record_bytes


async def open_loop(
    bootstrap: str, topics: Topics, rate_per_s: float, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """Send at ``rate_per_s`` for ``warmup_s + duration_s``; latency of every counted request."""
    kafka = fast_kafka(bootstrap)
    n_warm, n = int(rate_per_s * warmup_s), int(rate_per_s * (warmup_s + duration_s))
    batch = [(r.request_id.encode(), encode(r)) for r in requests_for(topics, n)]
    sent_at: dict[bytes, float] = {}
    latencies: dict[bytes, float] = {}
    consumer = AIOKafkaConsumer(
        **kafka.consumer_kwargs(None), fetch_max_wait_ms=_CLIENT_FETCH_WAIT_MS
    )
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await consumer.start()
    await producer.start()
    try:
        await consumer.topics()
        tps = [
            TopicPartition(topics.replies, p)
            for p in sorted(consumer.partitions_for_topic(topics.replies) or ())
        ]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)

        async def read() -> None:
            while len(latencies) < n:
                got = await consumer.getmany(timeout_ms=50)
                now = time.perf_counter()
                for records in got.values():
                    for m in records:
                        if m.key in sent_at and m.key not in latencies:
                            latencies[m.key] = now - sent_at[m.key]

        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
        start = loop.time()
        behind = 0
        acks = []
        for i, (key, raw) in enumerate(batch):
            delay = start + i / rate_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                behind += 1
            sent_at[key] = time.perf_counter()
            acks.append(await producer.send(topics.infer(MODEL), raw, key=key))
        send_s = loop.time() - start
        await asyncio.gather(*acks)
        try:
            await asyncio.wait_for(reader, 30)
        except TimeoutError:
            pass
    finally:
        await producer.stop()
        await consumer.stop()
    counted = [latencies[k] * 1000 for k, _ in batch[n_warm:] if k in latencies]
    qs = statistics.quantiles(counted, n=100, method="inclusive")
    return {
        "requests": n - n_warm,
        "answered": len(counted),
        "achieved_rps": n / send_s,
        "sends_behind_schedule": behind,
        "p50_ms": statistics.median(counted),
        "p90_ms": qs[89],
        "p99_ms": qs[98],
        "max_ms": max(counted),
        "mean_ms": statistics.mean(counted),
    }


async def one_run(
    side: str,
    wait_ms: int,
    bootstrap: str,
    hub: Path,
    work: Path,
    sizes: tuple[int, int],
    args: argparse.Namespace,
    rate: float,
) -> dict[str, Any]:
    topics = await new_namespace(bootstrap, "ll")
    run = work / topics.namespace
    service = _service(side, bootstrap, topics, hub, run, wait_ms, sizes)
    await start_all([service])
    try:
        await asyncio.sleep(args.settle_s)  # let the group settle before the clock starts
        return await open_loop(bootstrap, topics, rate, args.duration_s, args.warmup_s)
    finally:
        await service.terminate(20)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-latency-"))
    try:
        return await _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    hub = work / "hub"
    await asyncio.to_thread(build_demo_hub, hub)
    with running_broker(log_dir=work) as broker:
        b = broker.bootstrap
        peak, reply_bytes, record_bytes = await measure_peak(b, hub, work, args.peak_requests)
        measured_peak = peak
        if args.peak_rps:
            peak = args.peak_rps
        rate = args.fraction * peak
        configs = []
        for wait_ms in args.fetch_max_wait_ms:
            runs: dict[str, list[dict[str, Any]]] = {"worker": [], "baseline": []}
            for _ in range(args.repeats):
                for side in ("worker", "baseline"):
                    result = await one_run(
                        side, wait_ms, b, hub, work, (reply_bytes, record_bytes), args, rate
                    )
                    runs[side].append(result)
                    print(
                        f"  fetch wait {wait_ms} ms, {side}: p50 {result['p50_ms']:.2f} ms, "
                        f"p99 {result['p99_ms']:.2f} ms",
                        flush=True,
                    )
            configs.append(_summary(wait_ms, runs))
    return {
        "generated_unix_s": int(time.time()),
        "peak_rps": peak,
        "peak_rps_measured": measured_peak,
        "peak_measured_requests": args.peak_requests,
        "fraction": args.fraction,
        "rate_rps": rate,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "repeats": args.repeats,
        "reply_bytes": reply_bytes,
        "record_bytes": record_bytes,
        "client_fetch_max_wait_ms": _CLIENT_FETCH_WAIT_MS,
        "configs": configs,
        "target_p50_ms": TARGET_P50_MS,
        "target_p99_ms": TARGET_P99_MS,
    }


def _summary(wait_ms: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p99_ms", "mean_ms")}
        for side, rs in runs.items()
    }
    added_p50 = med["worker"]["p50_ms"] - med["baseline"]["p50_ms"]
    added_p99 = med["worker"]["p99_ms"] - med["baseline"]["p99_ms"]
    return {
        "fetch_max_wait_ms": wait_ms,
        "as_shipped": wait_ms == _DEFAULT_FETCH_WAIT_MS,
        "runs": runs,
        "median": med,
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "met": added_p50 <= TARGET_P50_MS and added_p99 <= TARGET_P99_MS,
    }


def print_table(r: dict[str, Any]) -> None:
    print(
        f"\nEnd-to-end latency at {r['fraction']:.0%} of peak "
        f"({r['rate_rps']:.0f} of {r['peak_rps']:.0f} req/s), demo-mlp, open loop, "
        f"{r['repeats']} x {r['duration_s']:.0f} s per side; median (min-max) over runs"
    )
    rows = []
    for c in r["configs"]:

        def spread(side: str, key: str, c: dict[str, Any] = c) -> str:
            values = [run[key] for run in c["runs"][side]]
            return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

        label = f"{c['fetch_max_wait_ms']} ms" + (" (as shipped)" if c["as_shipped"] else "")
        rows += [
            [label, side, spread(side, "p50_ms"), spread(side, "p99_ms"), spread(side, "max_ms")]
            for side in ("worker", "baseline")
        ]
        ok50 = "met" if c["added_p50_ms"] <= r["target_p50_ms"] else "NOT met"
        ok99 = "met" if c["added_p99_ms"] <= r["target_p99_ms"] else "NOT met"
        rows.append(
            [
                label,
                "added (worker - baseline)",
                f"{c['added_p50_ms']:.2f} (<= {r['target_p50_ms']:.0f}: {ok50})",
                f"{c['added_p99_ms']:.2f} (<= {r['target_p99_ms']:.0f}: {ok99})",
                "-",
            ]
        )
    headers = ["consumer fetch wait", "side", "p50 ms", "p99 ms", "max ms"]
    print(table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peak-requests", type=int, default=3000)
    parser.add_argument("--peak-rps", type=float, help="use this peak instead of the measured")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        nargs="+",
        default=[_DEFAULT_FETCH_WAIT_MS, 10],
        help="consumer fetch waits to compare (worker and baseline alike)",
    )
    # Internal: the baseline echo service and the worker with another fetch wait.
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    parser.add_argument("--reply-bytes", type=int, default=900, help=argparse.SUPPRESS)
    parser.add_argument("--record-bytes", type=int, default=700, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        args.fetch_max_wait_ms = args.fetch_max_wait_ms[0]
        asyncio.run(echo(args))
        return
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["runtime_s"] = time.perf_counter() - started
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing["latency"] = results
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print_table(results)
    print(f"\nRuntime {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
