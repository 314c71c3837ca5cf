"""Intake benchmarks: the worker's throughput against two floors measured in the same run, and
window scaling.

Run with ``python -m bench.intake`` (``make bench``; ``--smoke`` for tiny sizes). Every side
runs in this process against the same real broker, on a fresh namespace (4 request
partitions) per run, over the same N pre-encoded demo-mlp requests (VANILLA), produced to the
request topic before the side starts. Throughput is N-1 over the span of the reply topic's
record timestamps (first to last reply), so the consumer-group join, which differs run to run,
is excluded the same way for every side; nothing else reads the broker while a side runs.

1. ``worker``: ``worker.app.Worker`` as ``inference-node worker`` builds it (admitted by a
   pinned authority; ``tune_gc`` applied), its full path: decode, validate, ONNX, hash, sign
   twice (ed25519 + EIP-191), publish the reply and the settlement record (each acknowledged,
   acks=all, the record only after the reply's ack), ordered commits every 100 ms.
2. ``raw`` (floor A): ``bench.rawloop.RawLoop``, a raw aiokafka loop doing the same Kafka
   work as the worker and nothing else: same client settings, group subscription, in-flight
   cap (256) and commit cadence (100 ms); per request a reply keyed by the request id, then,
   once it is acknowledged, a settlement record keyed as the worker keyed its own in the same
   repetition; the worker's headers and its mean value sizes of that repetition; ``send()``
   then awaiting the delivery future. No per-partition window (an upper bound).
3. ``floor`` (floor B): floor A plus the cryptographic floor of a v2 result, inline before
   each reply: one sha256 of the request payload and one of the output, one ed25519 and one
   secp256k1 EIP-191 signature (keccak included) over their digest (``schemas.signing``).

The three sides alternate, ``--repeats`` times (default 5, N = 30,000: every run is at least
30,000 requests). Reported: medians and min-max per side, worker/raw and worker/floor (ratio
of medians, and per repetition), and the same over the middle 80 % of each run's replies (the
last partitions to finish run alone, with one partition's window, which stretches the tail).
Floor A is run once more with the worker's per-partition window as well (its cost, shown apart).
``--profile PATH`` runs one more worker run under cProfile and writes its top functions there.

Window scaling: a fixed 50 ms engine on ONE partition, ``window x 30`` requests; throughput
divided by the ideal ``window / 50 ms`` shows how much in-partition concurrency intake
delivers. Run as shipped (consumer fetch wait 500 ms) and with a 10 ms fetch wait: records
fetched beyond the window are handed back by a seek, and the fetch that follows waits for the
consumer's prefetch at the log end, which Tansu answers only when the fetch wait runs out.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import pstats
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import (
    add_run_options,
    cpu_busy,
    demo_hub,
    results_path,
    spread,
    table,
    write_section,
)
from bench.rawloop import Crypto, RawLoop, Shape, crypto_floor
from client import build_request
from infra.dev.broker import running_broker
from infra.dev.demo_models import add_fixed_latency_model
from infra.kafka import KafkaSettings
from infra.kafka.admin import ensure_topics
from schemas import MLInput, Tensor, Topics, encode
from schemas.signing import ChainSigner, Signer
from schemas.topics import standard_topics
from tests.harness.admission import AdmissionFile
from worker.app import Worker, tune_gc
from worker.settings import WorkerSettings

__all__ = [
    "Corpus",
    "Run",
    "bench_kafka",
    "corpus",
    "main",
    "measured_run",
    "produce_corpus",
    "run_namespace",
    "run_worker",
    "table",
]

MODEL = "demo-mlp"
PARTITIONS = 4
WINDOW = 64
MAX_IN_FLIGHT = 256
COMMIT_INTERVAL_S = 0.1
"""The worker's defaults (``WorkerSettings``), which the raw loops copy."""
SIDES = ("worker", "raw", "floor")


GROUP_TIMEOUTS_MS = {"session": 3000, "heartbeat": 500}
"""A group join on Tansu takes about 2/3 of the session timeout; ``--smoke`` shortens it."""


def bench_kafka(bootstrap: str, fetch_max_wait_ms: int | None = None) -> KafkaSettings:
    """The shipped client settings (``KafkaSettings``), shorter group timeouts."""
    settings = KafkaSettings(
        bootstrap_servers=bootstrap,
        session_timeout_ms=GROUP_TIMEOUTS_MS["session"],
        heartbeat_interval_ms=GROUP_TIMEOUTS_MS["heartbeat"],
    )
    if fetch_max_wait_ms is not None:
        settings = settings.model_copy(update={"fetch_max_wait_ms": fetch_max_wait_ms})
    return settings


Corpus = list[tuple[bytes, bytes]]
"""(key, value) of each request as a client produces it: key = request id."""


def corpus(n: int, model: str = MODEL) -> Corpus:
    """n encoded demo-mlp requests replying to the namespace's shared replies topic."""
    out = []
    for i in range(n):
        payload = MLInput(
            tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[i % 13 / 7, 0.5, -1.0, 2.0])}
        )
        request = build_request(model, payload)
        out.append((request.request_id.encode(), encode(request)))
    return out


async def produce_corpus(kafka: KafkaSettings, topic: str, messages: Corpus) -> None:
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        acks = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def _read_all(kafka: KafkaSettings, topic: str, n: int, timeout_s: float) -> list[Any]:
    """The first n messages of ``topic`` (all partitions), waiting up to ``timeout_s``."""
    consumer = AIOKafkaConsumer(**kafka.consumer_kwargs(None))
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(seen) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(seen)}/{n} messages on {topic} after {timeout_s} s")
            for records in (await consumer.getmany(timeout_ms=200)).values():
                seen.extend(records)
        return seen
    finally:
        await consumer.stop()


async def run_namespace(bootstrap: str, models: list[str], partitions: int) -> Topics:
    ns = "b" + uuid.uuid4().hex[:10]
    await ensure_topics(bootstrap, standard_topics(ns, models, request_partitions=partitions))
    return Topics(ns)


@dataclass
class Run:
    """One side's run: its rate and what it published."""

    rps: float
    span_s: float
    steady_rps: float
    """Over the middle 80 % of replies (10th to 90th percentile of their timestamps): the
    start and the tail (the last partitions to finish run alone) left out."""
    replies: list[Any] = field(repr=False)
    records: list[Any] = field(repr=False)

    @property
    def reply_bytes(self) -> int:
        return round(statistics.mean(len(m.value) for m in self.replies))

    @property
    def record_bytes(self) -> int:
        return round(statistics.mean(len(m.value) for m in self.records))


async def measured_run(kafka: KafkaSettings, topics: Topics, n: int) -> Run:
    replies = await _read_all(kafka, topics.replies, n, timeout_s=60)
    records = await _read_all(kafka, topics.settlement, n, timeout_s=60)
    stamps = sorted(m.timestamp for m in replies)
    span_s = (stamps[-1] - stamps[0]) / 1000
    rps = (len(stamps) - 1) / span_s if span_s > 0 else float("inf")
    lo, hi = len(stamps) // 10, len(stamps) * 9 // 10
    middle_s = (stamps[hi] - stamps[lo]) / 1000
    steady = (hi - lo) / middle_s if middle_s > 0 else float("inf")
    return Run(rps, span_s, steady, replies, records)


def _answered(worker: Worker) -> int:
    return int(
        sum(
            s.value
            for metric in worker.metrics.requests.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        )
    )


async def run_worker(
    bootstrap: str,
    hub: Path,
    model: str,
    messages: Corpus,
    partitions: int,
    window: int,
    work: Path,
    *,
    profile: Path | None = None,
    fetch_max_wait_ms: int | None = None,
) -> Run:
    """The worker over ``messages`` (see the module docstring)."""
    kafka = bench_kafka(bootstrap, fetch_max_wait_ms)
    topics = await run_namespace(bootstrap, [model], partitions)
    await produce_corpus(kafka, topics.infer(model), messages)
    admission = AdmissionFile(work / "admission.json")
    settings = WorkerSettings(
        namespace=topics.namespace,
        kafka=kafka,
        group_id=f"{topics.namespace}-w",
        models=[model],
        hub_dir=hub,
        cache_dir=work / "cache",
        key_dir=work / "keys",
        admission=admission.settings(),
        window_per_partition=window,
        max_in_flight=max(MAX_IN_FLIGHT, window * partitions),
    )
    admission.admit_worker(settings)
    worker = Worker(settings)
    await worker.setup()
    tune_gc()  # as `inference-node worker` does
    profiler = cProfile.Profile() if profile is not None else None
    if profiler is not None:
        profiler.enable()
    task = asyncio.create_task(worker.run())
    try:
        # Progress from the worker's own counter (no consumer competing with it for the CPU).
        deadline = time.monotonic() + 600
        while _answered(worker) < len(messages):
            if task.done():
                task.result()
                raise RuntimeError("the worker stopped early")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{_answered(worker)}/{len(messages)} answered")
            await asyncio.sleep(0.2)
    finally:
        if profiler is not None:
            profiler.disable()
        worker.stop()
        await task
        await worker.close()
    if profiler is not None and profile is not None:
        _write_profile(profiler, profile)
    return await measured_run(kafka, topics, len(messages))


def _write_profile(profiler: cProfile.Profile, path: Path) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    path.write_text(out.getvalue())


# -- the raw loops (floors A and B) ---------------------------------------------------------


async def run_raw(
    bootstrap: str,
    messages: Corpus,
    partitions: int,
    shape: Shape,
    crypto: Crypto | None = None,
    window: int | None = None,
) -> Run:
    """Floor A (``crypto`` None) or floor B over ``messages`` (``bench.rawloop``); with
    ``window``, the worker's per-partition window too."""
    kafka = bench_kafka(bootstrap)
    topics = await run_namespace(bootstrap, [MODEL], partitions)
    await produce_corpus(kafka, topics.infer(MODEL), messages)
    loop = RawLoop(
        kafka,
        topics.infer(MODEL),
        topics,
        f"{topics.namespace}-raw",
        shape,
        crypto=crypto,
        window=window,
        max_in_flight=MAX_IN_FLIGHT,
        commit_interval_s=COMMIT_INTERVAL_S,
    )
    await loop.start()
    try:
        await loop.run(lambda: loop.answered >= len(messages))
    finally:
        await loop.stop()
    return await measured_run(kafka, topics, len(messages))


# -- the benchmark ----------------------------------------------------------------------------


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


async def throughput(
    bootstrap: str, hub: Path, work: Path, n: int, repeats: int, profile: Path | None
) -> dict[str, Any]:
    messages = corpus(n)
    runs: dict[str, list[Run]] = {side: [] for side in SIDES}
    signer_seed = hashlib.sha256(b"bench-floor").digest()
    crypto = crypto_floor(Signer(signer_seed), ChainSigner(signer_seed))
    busy: list[float | None] = []
    for i in range(repeats):
        busy.append(await asyncio.to_thread(cpu_busy))
        run = await run_worker(bootstrap, hub, MODEL, messages, PARTITIONS, WINDOW, work)
        runs["worker"].append(run)
        shape = Shape.of(run.replies, run.records)
        runs["raw"].append(await run_raw(bootstrap, messages, PARTITIONS, shape))
        runs["floor"].append(await run_raw(bootstrap, messages, PARTITIONS, shape, crypto))
        print(
            f"  run {i + 1}/{repeats}: "
            + ", ".join(f"{side} {runs[side][-1].rps:,.0f} req/s" for side in SIDES),
            flush=True,
        )
    # Floor A again with the worker's per-partition window too (one run): what the window and
    # its seek hand-back cost a raw loop.
    windowed = await run_raw(bootstrap, messages, PARTITIONS, shape, window=WINDOW)
    if profile is not None:
        await run_worker(bootstrap, hub, MODEL, messages, PARTITIONS, WINDOW, work, profile=profile)
    rps = {side: [r.rps for r in rs] for side, rs in runs.items()}
    steady = {side: [r.steady_rps for r in rs] for side, rs in runs.items()}
    med = {side: statistics.median(v) for side, v in rps.items()}
    steady_med = {side: statistics.median(v) for side, v in steady.items()}
    last = runs["worker"][-1]
    return {
        "requests": n,
        "repeats": repeats,
        "partitions": PARTITIONS,
        "cpu_busy_before": busy,
        "rps": rps,
        "rps_median": med,
        "steady_rps": steady,
        "steady_rps_median": steady_med,
        "steady_worker_vs_raw_ratio": steady_med["worker"] / steady_med["raw"],
        "steady_worker_vs_floor_ratio": steady_med["worker"] / steady_med["floor"],
        "span_s": {side: [r.span_s for r in rs] for side, rs in runs.items()},
        "worker_vs_raw_ratio": med["worker"] / med["raw"],
        "worker_vs_floor_ratio": med["worker"] / med["floor"],
        "floor_vs_raw_ratio": med["floor"] / med["raw"],
        "worker_vs_raw_per_run": _ratios(rps["worker"], rps["raw"]),
        "worker_vs_floor_per_run": _ratios(rps["worker"], rps["floor"]),
        "reply_bytes": last.reply_bytes,
        "record_bytes": last.record_bytes,
        "request_bytes": round(statistics.mean(len(v) for _, v in messages)),
        "settlement_keying": shape.keying,
        "reply_headers": [k for k, _ in last.replies[0].headers],
        "raw_with_window": {
            "window": WINDOW,
            "rps": windowed.rps,
            "steady_rps": windowed.steady_rps,
        },
    }


async def window_scaling(
    bootstrap: str, hub: Path, work: Path, windows: list[int], per_window: int, wait_ms: int | None
) -> list[dict[str, Any]]:
    out = []
    for window in windows:
        n = max(per_window, window * (per_window // 7))
        messages = corpus(n, "fixed-50")
        run = await run_worker(
            bootstrap, hub, "fixed-50", messages, 1, window, work, fetch_max_wait_ms=wait_ms
        )
        ideal = window / 0.050
        out.append(
            {
                "window": window,
                "requests": n,
                "fetch_max_wait_ms": wait_ms or KafkaSettings().fetch_max_wait_ms,
                "rps": run.rps,
                "ideal_rps": ideal,
                "efficiency": run.rps / ideal,
            }
        )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-bench-"))
    hub = await asyncio.to_thread(demo_hub, work, args.hub)
    add_fixed_latency_model(hub, "fixed-50", 50)
    with running_broker(log_dir=work) as broker:
        return {
            "smoke": args.smoke,
            "throughput": await throughput(
                broker.bootstrap, hub, work, args.n, args.repeats, args.profile
            ),
            "window_scaling_50ms": await window_scaling(
                broker.bootstrap, hub, work, args.windows, args.per_window, None
            ),
            "window_scaling_50ms_fetch_wait_10ms": await window_scaling(
                broker.bootstrap, hub, work, args.windows, args.per_window, 10
            ),
        }


def print_tables(results: dict[str, Any]) -> None:
    t = results["throughput"]
    print(
        f"\nWorker vs floors: demo-mlp, {t['requests']:,} requests per run, "
        f"{t['partitions']} partitions, {t['repeats']} runs (req/s, median (min-max))"
    )
    per_run = {"raw": t["worker_vs_raw_per_run"], "floor": t["worker_vs_floor_per_run"]}
    ratio = {"raw": t["worker_vs_raw_ratio"], "floor": t["worker_vs_floor_ratio"]}
    steady = {"raw": t["steady_worker_vs_raw_ratio"], "floor": t["steady_worker_vs_floor_ratio"]}
    names = {
        "worker": "worker",
        "raw": "raw aiokafka loop (floor A)",
        "floor": "raw loop + crypto (floor B)",
    }
    rows = []
    for side, name in names.items():
        against = "-" if side == "worker" else f"{ratio[side]:.3f}"
        per = "-" if side == "worker" else spread(per_run[side], "{:.3f}")
        steady_ratio = "-" if side == "worker" else f"{steady[side]:.3f}"
        rows.append(
            [
                name,
                spread(t["rps"][side]),
                against,
                per,
                spread(t["steady_rps"][side]),
                steady_ratio,
            ]
        )
    headers = [
        "side",
        "req/s",
        "worker / side",
        "per run",
        "req/s, middle 80 %",
        "worker / side (middle)",
    ]
    print(table(headers, rows))
    w = t["raw_with_window"]
    print(
        f"Floor A with the worker's window of {w['window']} per partition too (1 run): "
        f"{w['rps']:,.0f} req/s ({w['steady_rps']:,.0f} over the middle 80 %)."
    )
    for key, label in (
        ("window_scaling_50ms", "as shipped (fetch wait 500 ms)"),
        ("window_scaling_50ms_fetch_wait_10ms", "consumer fetch wait 10 ms"),
    ):
        print(f"\nWindow scaling: fixed 50 ms engine, one partition, {label}")
        rows = [
            [str(r["window"]), f"{r['rps']:.1f}", f"{r['ideal_rps']:.0f}", f"{r['efficiency']:.0%}"]
            for r in results[key]
        ]
        print(table(["window", "req/s", "ideal", "efficiency"], rows))


def summary(results: dict[str, Any]) -> dict[str, Any]:
    t = results["throughput"]
    window64 = [r for r in results["window_scaling_50ms"] if r["window"] == WINDOW]
    return {
        "worker_rps": t["rps_median"]["worker"],
        "worker_vs_raw_ratio": t["worker_vs_raw_ratio"],
        "worker_vs_floor_ratio": t["worker_vs_floor_ratio"],
        "window64_efficiency": window64[0]["efficiency"] if window64 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(parser, hub=True)
    parser.add_argument("--n", type=int, default=30_000, help="requests per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument(
        "--per-window", type=int, default=210, help="requests per window-scaling run (x window/7)"
    )
    parser.add_argument("--profile", type=Path, help="profile one more worker run into this file")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeats, args.windows, args.per_window = 300, 1, [64], 14
        GROUP_TIMEOUTS_MS.update(session=1000, heartbeat=100)
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["runtime_s"] = time.perf_counter() - started
    write_section(results_path(args), "intake", results, summary(results))
    print_tables(results)
    print(f"\nRuntime {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
