"""Added latency at 10 %, 50 % and 90 % of peak, and where it goes (targets at 50 %: added
p50 <= 5 ms, p99 <= 20 ms).

Run with ``python -m bench.latency`` (``--smoke`` for tiny sizes). Method:

1. Peak: N demo-mlp requests are pre-produced to a 4-partition topic, then one
   ``inference-node worker`` process is started; its peak is N-1 over the span of its replies'
   record timestamps (as in ``bench.intake``, but out of process, as measured below).
   ``--peak-rps`` skips this. The worker's replies and settlement records give the baseline
   its message sizes and settlement keying.
2. Open loop at each fraction of that peak: this process sends requests on a fixed schedule,
   never waiting for replies, and reads the reply topic itself; a request's latency is the
   time from just before its ``send`` to the moment its reply comes out of ``getmany`` (one
   monotonic clock, one process). The first ``--warmup-s`` of each run is not counted.
3. The same open loop against the baseline: ``bench.rawloop.RawLoop`` (floor A of
   ``bench.intake``: the worker's Kafka work and nothing else) in a process of its own
   (``--echo``), with the worker's client settings.
4. Added latency = worker minus baseline, for p50 and p99 (medians over ``--repeats`` runs of
   each, the two sides run alternately so machine noise hits both alike).
5. Where it goes: the worker serves ``/metrics``; its histograms are read just before the
   counted part of each run and after its last reply, and the difference is that part's own:
   queue wait (the request's record timestamp, set by the client's ``send``, to the start of
   its execution: client linger, broker append, the worker's fetch and any wait for a window
   slot), pipeline (execute, hash, sign twice), publish (reply and settlement record, each
   acknowledged) and end to end (record timestamp to the second acknowledgement). Means are
   exact (sum / count); p50 and p99 are interpolated in the histogram's buckets (1, 2.5, 5,
   10, 25, 50, 100, 250 ms, ...), so they are coarse.

Both services use a consumer fetch wait of 10 ms (``--fetch-max-wait-ms``): Tansu does not
answer a waiting Fetch when new data arrives (it answers when the wait runs out), so with the
shipped 500 ms that wait, not the worker, sets the floor of end-to-end latency at low rates.
The shipped setting is measured too, at 50 % only (``--shipped-fractions``).

A quiet run: run it on an otherwise idle machine. Both services run as separate processes on
the same broker and machine as the load generator (on a 2-core machine they compete with it
for CPU, which shows in the tails). Before each run the machine's CPU busy fraction (all
processes, 0.5 s from /proc/stat) and the 1-minute load average are recorded; a run that
starts on a machine more than 25 % busy is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from bench.chaos_support import MODEL, Child, new_namespace, requests_for, start_all, worker_env
from bench.common import (
    add_run_options,
    cpu_busy,
    demo_hub,
    results_path,
    spread,
    table,
    write_section,
)
from bench.rawloop import RawLoop, Shape
from infra.dev.broker import free_port, running_broker
from infra.kafka import KafkaSettings
from schemas import Topics, encode
from tests.harness.outcomes import read_all

__all__ = ["main"]

TARGET_P50_MS = 5.0
TARGET_P99_MS = 20.0
SHIPPED_FETCH_WAIT_MS = KafkaSettings().fetch_max_wait_ms
_CLIENT_FETCH_WAIT_MS = 10
"""The load generator's own reply reader: short, so it adds little to either side."""
QUIET_CPU_BUSY = 0.25
"""Busier than this before a run (every process, all cores) and the run is flagged."""
STAGES = {
    "queue_wait": ("og_worker_queue_wait_seconds", None),
    "pipeline": ("og_worker_inference_seconds", None),
    "publish": ("og_worker_publish_seconds", "reply"),
    "end_to_end": ("og_worker_end_to_end_seconds", None),
}
"""Stage -> (histogram, ``kind`` label) of the worker's metrics (``worker.metrics``)."""


GROUP_TIMEOUTS_MS = {"session": 3000, "heartbeat": 500}
"""A group join on Tansu takes about 2/3 of the session timeout; ``--smoke`` shortens it."""


def _kafka(bootstrap: str, fetch_max_wait_ms: int | None = None) -> KafkaSettings:
    settings = KafkaSettings(
        bootstrap_servers=bootstrap,
        session_timeout_ms=GROUP_TIMEOUTS_MS["session"],
        heartbeat_interval_ms=GROUP_TIMEOUTS_MS["heartbeat"],
    )
    if fetch_max_wait_ms is not None:
        settings = settings.model_copy(update={"fetch_max_wait_ms": fetch_max_wait_ms})
    return settings


# -- the baseline service (``--echo``) --------------------------------------------------------


async def echo(args: argparse.Namespace) -> None:
    session_ms = args.session_timeout_ms
    GROUP_TIMEOUTS_MS.update(session=session_ms, heartbeat=max(100, session_ms // 6))
    topics = Topics(args.namespace)
    key = bytes.fromhex(args.settlement_key) if args.settlement_key else None
    loop = RawLoop(
        _kafka(args.bootstrap, args.fetch_max_wait_ms[0]),
        topics.infer(MODEL),
        topics,
        f"{topics.namespace}-echo",
        Shape(args.reply_bytes, args.record_bytes, key),
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await loop.start()
    args.ready_file.write_text("ready\n")
    try:
        await loop.run(stop.is_set)
    finally:
        await loop.stop()


def _worker_env(
    bootstrap: str, topics: Topics, hub: Path, state: Path, wait_ms: int
) -> dict[str, str]:
    env = worker_env(bootstrap, topics, hub, state)
    env["OG_WORKER_KAFKA__FETCH_MAX_WAIT_MS"] = str(wait_ms)
    env["OG_WORKER_KAFKA__SESSION_TIMEOUT_MS"] = str(GROUP_TIMEOUTS_MS["session"])
    env["OG_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS"] = str(GROUP_TIMEOUTS_MS["heartbeat"])
    return env


def _service(
    side: str, bootstrap: str, topics: Topics, hub: Path, run: Path, wait_ms: int, shape: Shape
) -> tuple[Child, int | None]:
    """The worker (serving ``/metrics`` on the port returned) or the baseline."""
    if side == "worker":
        port = free_port()
        env = _worker_env(bootstrap, topics, hub, run / "node", wait_ms)
        env["OG_WORKER_METRICS_PORT"] = str(port)
        return Child("worker", "worker", env, run), port
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
        str(shape.reply_bytes),
        "--record-bytes",
        str(shape.record_bytes),
        "--settlement-key",
        (shape.settlement_key or b"").hex(),
        "--fetch-max-wait-ms",
        str(wait_ms),
        "--session-timeout-ms",
        str(GROUP_TIMEOUTS_MS["session"]),
    ]
    return Child("echo", "echo", dict(os.environ), run, command), None


# -- the worker's histograms ------------------------------------------------------------------

Histograms = dict[str, dict[str, Any]]


def _scrape(port: int) -> Histograms:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {name: (stage, kind) for stage, (name, kind) in STAGES.items()}
    out: Histograms = {stage: {"count": 0.0, "sum": 0.0, "buckets": {}} for stage in STAGES}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        stage, kind = wanted[family.name]
        for sample in family.samples:
            if kind is not None and sample.labels.get("kind") != kind:
                continue
            h = out[stage]
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                h["buckets"][le] = h["buckets"].get(le, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                h["count"] += sample.value
            elif sample.name.endswith("_sum"):
                h["sum"] += sample.value
    return out


def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float:
    """The q-quantile (seconds) interpolated in cumulative ``buckets`` (le, count)."""
    rank, lower, below = q * count, 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


def stages(before: Histograms, after: Histograms) -> dict[str, dict[str, float]]:
    """Per stage, what happened between two scrapes: count, mean, ~p50 and ~p99 (ms)."""
    out = {}
    for stage in STAGES:
        a, b = after[stage], before[stage]
        count = a["count"] - b["count"]
        if count <= 0:
            continue
        buckets = sorted((le, n - b["buckets"].get(le, 0.0)) for le, n in a["buckets"].items())
        out[stage] = {
            "count": count,
            "mean_ms": (a["sum"] - b["sum"]) / count * 1000,
            "p50_ms": _quantile(buckets, count, 0.50) * 1000,
            "p99_ms": _quantile(buckets, count, 0.99) * 1000,
        }
    return out


# -- measuring --------------------------------------------------------------------------------


async def measure_peak(
    bootstrap: str, hub: Path, work: Path, n: int, wait_ms: int
) -> tuple[float, Shape]:
    """Requests/s of one worker process over n pre-produced requests, and what it published."""
    topics = await new_namespace(bootstrap, "lp")
    kafka = _kafka(bootstrap)
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        acks = [
            await producer.send(topics.infer(MODEL), encode(r), key=r.request_id.encode())
            for r in requests_for(topics, n)
        ]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    run = work / topics.namespace
    worker = Child(
        "worker", "worker", _worker_env(bootstrap, topics, hub, run / "node", wait_ms), run
    )
    await start_all([worker])
    try:
        deadline = time.monotonic() + 300
        replies: list[Any] = []
        while len(replies) < n and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            replies = await read_all(kafka, topics.replies, idle_s=0.3)
        records = await read_all(kafka, topics.settlement, idle_s=0.3)
    finally:
        await worker.terminate(20)
    if len(replies) < n or not records:
        raise RuntimeError(f"peak run: {len(replies)}/{n} replies, {len(records)} records")
    stamps = sorted(m.timestamp for m in replies)
    rate = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    return rate, Shape.of(replies, records)


async def open_loop(
    bootstrap: str,
    topics: Topics,
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    metrics_port: int | None,
) -> dict[str, Any]:
    """Send at ``rate_per_s`` for ``warmup_s + duration_s``; latency of every counted request
    (and, with ``metrics_port``, the worker's stages over the counted part)."""
    kafka = _kafka(bootstrap)
    n_warm, n = int(rate_per_s * warmup_s), int(rate_per_s * (warmup_s + duration_s))
    batch = [(r.request_id.encode(), encode(r)) for r in requests_for(topics, n)]
    sent_at: dict[bytes, float] = {}
    latencies: dict[bytes, float] = {}
    consumer = AIOKafkaConsumer(
        **kafka.consumer_kwargs(None) | {"fetch_max_wait_ms": _CLIENT_FETCH_WAIT_MS}
    )
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await consumer.start()
    await producer.start()
    before: Histograms | None = None
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
            if i == n_warm and metrics_port is not None:
                before = await asyncio.to_thread(_scrape, metrics_port)
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
            async with asyncio.timeout(30):
                await reader
        except TimeoutError:
            pass
        after = await asyncio.to_thread(_scrape, metrics_port) if metrics_port else None
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
        "stages": stages(before, after) if before is not None and after is not None else {},
    }


async def one_run(
    side: str,
    wait_ms: int,
    bootstrap: str,
    hub: Path,
    work: Path,
    shape: Shape,
    args: argparse.Namespace,
    rate: float,
) -> dict[str, Any]:
    topics = await new_namespace(bootstrap, "ll")
    run = work / topics.namespace
    service, port = _service(side, bootstrap, topics, hub, run, wait_ms, shape)
    load_1m = os.getloadavg()[0]
    busy = await asyncio.to_thread(cpu_busy)
    if busy is not None and busy > QUIET_CPU_BUSY:
        print(f"  warning: the machine is {busy:.0%} busy before this run", flush=True)
    await start_all([service])
    try:
        await asyncio.sleep(args.settle_s)  # let the group settle before the clock starts
        result = await open_loop(bootstrap, topics, rate, args.duration_s, args.warmup_s, port)
    finally:
        await service.terminate(20)
    result["load_1m_before"] = load_1m
    result["cpu_busy_before"] = busy
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-latency-"))
    try:
        return await _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    hub = await asyncio.to_thread(demo_hub, work, args.hub)
    wait_ms = args.fetch_max_wait_ms[0]
    with running_broker(log_dir=work) as broker:
        b = broker.bootstrap
        measured, shape = await measure_peak(b, hub, work, args.peak_requests, wait_ms)
        peak = args.peak_rps or measured
        plan = [(wait_ms, f) for f in args.fractions]
        if args.shipped_fractions and wait_ms != SHIPPED_FETCH_WAIT_MS:
            plan += [(SHIPPED_FETCH_WAIT_MS, f) for f in args.shipped_fractions]
        configs = []
        for wait, fraction in plan:
            rate = fraction * peak
            runs: dict[str, list[dict[str, Any]]] = {"worker": [], "baseline": []}
            for _ in range(args.repeats):
                for side in ("worker", "baseline"):
                    result = await one_run(side, wait, b, hub, work, shape, args, rate)
                    runs[side].append(result)
                    print(
                        f"  fetch wait {wait} ms, {fraction:.0%} of peak, {side}: "
                        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms",
                        flush=True,
                    )
            configs.append(_summary(wait, fraction, rate, runs))
    return {
        "smoke": args.smoke,
        "generated_unix_s": int(time.time()),
        "peak_rps": peak,
        "peak_rps_measured": measured,
        "peak_measured_requests": args.peak_requests,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "repeats": args.repeats,
        "reply_bytes": shape.reply_bytes,
        "record_bytes": shape.record_bytes,
        "settlement_keying": shape.keying,
        "fetch_max_wait_ms": wait_ms,
        "client_fetch_max_wait_ms": _CLIENT_FETCH_WAIT_MS,
        "configs": configs,
        "target_p50_ms": TARGET_P50_MS,
        "target_p99_ms": TARGET_P99_MS,
    }


def _median_stages(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        got = [r["stages"][stage] for r in runs if stage in r.get("stages", {})]
        if got:
            out[stage] = {k: statistics.median(g[k] for g in got) for k in got[0]}
    return out


def _summary(
    wait_ms: int, fraction: float, rate: float, runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p99_ms", "mean_ms")}
        for side, rs in runs.items()
    }
    added_p50 = med["worker"]["p50_ms"] - med["baseline"]["p50_ms"]
    added_p99 = med["worker"]["p99_ms"] - med["baseline"]["p99_ms"]
    return {
        "fetch_max_wait_ms": wait_ms,
        "as_shipped": wait_ms == SHIPPED_FETCH_WAIT_MS,
        "fraction": fraction,
        "rate_rps": rate,
        "runs": runs,
        "median": med,
        "worker_stages": _median_stages(runs["worker"]),
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "met": added_p50 <= TARGET_P50_MS and added_p99 <= TARGET_P99_MS,
    }


def _label(c: dict[str, Any]) -> str:
    shipped = " (as shipped)" if c["as_shipped"] else ""
    return f"{c['fraction']:.0%}, fetch wait {c['fetch_max_wait_ms']} ms{shipped}"


def print_tables(r: dict[str, Any]) -> None:
    print(
        f"\nEnd-to-end latency, demo-mlp, open loop, peak {r['peak_rps']:.0f} req/s; "
        f"{r['repeats']} x {r['duration_s']:.0f} s per side and load; "
        "ms, median (min-max) over runs"
    )
    rows = []
    for c in r["configs"]:
        for side in ("worker", "baseline"):
            runs = c["runs"][side]
            rows.append(
                [
                    _label(c),
                    f"{c['rate_rps']:.0f}",
                    side,
                    spread([x["p50_ms"] for x in runs], "{:.2f}"),
                    spread([x["p99_ms"] for x in runs], "{:.2f}"),
                ]
            )
        rows.append(
            [
                _label(c),
                f"{c['rate_rps']:.0f}",
                "added (worker - baseline)",
                f"{c['added_p50_ms']:.2f}",
                f"{c['added_p99_ms']:.2f}",
            ]
        )
    print(table(["load", "req/s", "side", "p50", "p99"], rows))
    print(
        "\nWhere the worker's time goes (its own histograms over the counted part; "
        "mean exact, p50/p99 from buckets; ms)"
    )
    rows = []
    for c in r["configs"]:
        for stage, s in c["worker_stages"].items():
            rows.append(
                [
                    _label(c),
                    stage,
                    f"{s['mean_ms']:.2f}",
                    f"{s['p50_ms']:.2f}",
                    f"{s['p99_ms']:.2f}",
                ]
            )
        client = c["median"]["worker"]
        rows.append(
            [
                _label(c),
                "client-observed",
                f"{client['mean_ms']:.2f}",
                f"{client['p50_ms']:.2f}",
                f"{client['p99_ms']:.2f}",
            ]
        )
    print(table(["load", "stage", "mean", "~p50", "~p99"], rows))


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """Added latency at 50 % of peak with the measured fetch wait (10 ms by default)."""
    at_half = [
        c
        for c in r["configs"]
        if c["fraction"] == 0.5 and c["fetch_max_wait_ms"] == r["fetch_max_wait_ms"]
    ]
    if not at_half:
        return {"added_latency_p50_ms": None, "added_latency_p99_ms": None}
    return {
        "added_latency_p50_ms": at_half[0]["added_p50_ms"],
        "added_latency_p99_ms": at_half[0]["added_p99_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(parser, hub=True)
    parser.add_argument("--peak-requests", type=int, default=10_000)
    parser.add_argument("--peak-rps", type=float, help="use this peak instead of the measured")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument(
        "--shipped-fractions",
        type=float,
        nargs="*",
        default=[0.5],
        help="fractions also measured with the shipped 500 ms fetch wait (none: skip)",
    )
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        nargs=1,
        default=[10],
        help="consumer fetch wait of both services (worker and baseline alike)",
    )
    # Internal: the baseline service.
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    parser.add_argument("--reply-bytes", type=int, default=900, help=argparse.SUPPRESS)
    parser.add_argument("--record-bytes", type=int, default=700, help=argparse.SUPPRESS)
    parser.add_argument("--settlement-key", default="", help=argparse.SUPPRESS)
    parser.add_argument("--session-timeout-ms", type=int, default=3000, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        asyncio.run(echo(args))
        return
    if args.smoke:
        args.peak_requests, args.fractions, args.shipped_fractions = 300, [0.5], []
        args.duration_s, args.warmup_s, args.settle_s, args.repeats = 1.0, 0.3, 0.2, 1
        GROUP_TIMEOUTS_MS.update(session=1000, heartbeat=100)
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["runtime_s"] = time.perf_counter() - started
    write_section(results_path(args), "latency", results, summary(results))
    print_tables(results)
    print(f"\nRuntime {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
