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
2. ``raw`` (floor A): a raw aiokafka loop doing the same Kafka work and nothing else. Same
   consumer and producer settings (``KafkaSettings``: acks=all, linger, batch size, fetch
   wait), same group-managed subscription, same in-flight cap (``max_in_flight`` 256); per
   request the same two messages: a reply keyed by the request id (the request's key) on the
   replies topic, then, once that reply is acknowledged, a settlement record keyed by the
   worker's node id on the settlement topic; same headers (``og-schema-version`` and a fresh
   ``traceparent``), the same value sizes (the worker's mean reply and record sizes in the same
   repetition), the same produce API (``send()`` then awaiting its delivery future), and
   ordered commits of the answered prefix every 100 ms. It does its work a batch at a time (no
   task per request), which is the cheapest way to do it in asyncio.
3. ``floor`` (floor B): floor A plus the cryptographic floor of a v2 result, inline before
   each reply: one sha256 of the request payload and one of the output, one ed25519 signature
   and one secp256k1 EIP-191 signature (keccak included) over their digest, with the same
   libraries the worker signs with (``schemas.signing``).

The three sides alternate, ``--repeats`` times (default 5, N = 30,000: every run is at least
30,000 requests). Reported: medians and min-max per side, worker/raw and worker/floor (ratio
of medians, and per repetition). ``--profile PATH`` runs one more worker run under cProfile
and writes its top functions there.

Window scaling: a fixed 50 ms engine on ONE partition; throughput divided by the ideal
``window / 50 ms`` shows how much in-partition concurrency intake delivers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import os
import pstats
import statistics
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import add_run_options, results_path, spread, table, write_section
from client import build_request
from infra.dev.broker import running_broker
from infra.dev.demo_models import add_fixed_latency_model, build_demo_hub
from infra.kafka import KafkaSettings
from infra.kafka.admin import ensure_topics
from schemas import MLInput, Tensor, Topics, encode
from schemas.signing import ChainSigner, Signer
from schemas.topics import HEADER_SCHEMA_VERSION, HEADER_TRACEPARENT, standard_topics
from schemas.version import SCHEMA_VERSION
from tests.harness.admission import AdmissionFile
from worker.app import Worker, tune_gc
from worker.settings import WorkerSettings

__all__ = ["Run", "main", "run_worker", "table"]

MODEL = "demo-mlp"
PARTITIONS = 4
WINDOW = 64
MAX_IN_FLIGHT = 256
COMMIT_INTERVAL_S = 0.1
"""The worker's defaults (``WorkerSettings``), which the raw loops copy."""
SIDES = ("worker", "raw", "floor")


def _kafka(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap, session_timeout_ms=3000, heartbeat_interval_ms=500
    )


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


async def _produce(kafka: KafkaSettings, topic: str, messages: Corpus) -> None:
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


async def _namespace(bootstrap: str, models: list[str], partitions: int) -> Topics:
    ns = "b" + uuid.uuid4().hex[:10]
    await ensure_topics(bootstrap, standard_topics(ns, models, request_partitions=partitions))
    return Topics(ns)


@dataclass
class Run:
    """One side's run: its rate and what it published."""

    rps: float
    span_s: float
    replies: list[Any] = field(repr=False)
    records: list[Any] = field(repr=False)

    @property
    def reply_bytes(self) -> int:
        return round(statistics.mean(len(m.value) for m in self.replies))

    @property
    def record_bytes(self) -> int:
        return round(statistics.mean(len(m.value) for m in self.records))


async def _measured(kafka: KafkaSettings, topics: Topics, n: int) -> Run:
    replies = await _read_all(kafka, topics.replies, n, timeout_s=60)
    records = await _read_all(kafka, topics.settlement, n, timeout_s=60)
    stamps = sorted(m.timestamp for m in replies)
    span_s = (stamps[-1] - stamps[0]) / 1000
    rps = (len(stamps) - 1) / span_s if span_s > 0 else float("inf")
    return Run(rps, span_s, replies, records)


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
) -> Run:
    """The worker over ``messages`` (see the module docstring)."""
    kafka = _kafka(bootstrap)
    topics = await _namespace(bootstrap, [model], partitions)
    await _produce(kafka, topics.infer(model), messages)
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
    return await _measured(kafka, topics, len(messages))


def _write_profile(profiler: cProfile.Profile, path: Path) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    path.write_text(out.getvalue())


# -- the raw loops (floors A and B) ---------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the worker published per request, copied by the raw loops."""

    reply_bytes: int
    record_bytes: int
    settlement_key: bytes


class _Ordered:
    """Per partition: offsets answered, committed as a contiguous prefix (as the worker does)."""

    def __init__(self) -> None:
        self.pending: dict[Any, deque[list[Any]]] = {}
        self.committable: dict[Any, int] = {}

    def admit(self, tp: Any, next_offset: int) -> list[Any]:
        entry = [next_offset, False]
        self.pending.setdefault(tp, deque()).append(entry)
        return entry

    def offsets(self) -> dict[Any, int]:
        for tp, queue in self.pending.items():
            while queue and queue[0][1]:
                self.committable[tp] = queue.popleft()[0]
        out, self.committable = self.committable, {}
        return out


def _traceparent() -> bytes:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01".encode()


def crypto_floor(signer: Signer, chain: ChainSigner) -> Callable[[bytes, bytes], None]:
    """What a v2 result costs in cryptography: two sha256 and two signatures."""

    def sign(payload: bytes, output: bytes) -> None:
        digest = hashlib.sha256(
            hashlib.sha256(payload).digest() + hashlib.sha256(output).digest()
        ).digest()
        signer.sign_digest(digest)
        chain.sign_digest(digest)

    return sign


async def run_raw(
    bootstrap: str,
    messages: Corpus,
    partitions: int,
    shape: Shape,
    crypto: Callable[[bytes, bytes], None] | None = None,
) -> Run:
    """Floor A (``crypto`` None) or floor B over ``messages`` (see the module docstring)."""
    kafka = _kafka(bootstrap)
    topics = await _namespace(bootstrap, [MODEL], partitions)
    await _produce(kafka, topics.infer(MODEL), messages)
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    consumer = AIOKafkaConsumer(
        topics.infer(MODEL), **kafka.consumer_kwargs(f"{topics.namespace}-raw")
    )
    await producer.start()
    await consumer.start()
    reply, record = b"r" * shape.reply_bytes, b"s" * shape.record_bytes
    schema = (HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())
    ordered = _Ordered()
    in_flight, done = 0, 0
    room = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def answer(batch: Sequence[Any], entry: list[Any]) -> None:
        nonlocal in_flight, done
        headers = [[schema, (HEADER_TRACEPARENT, _traceparent())] for _ in batch]
        replies = []
        for msg, h in zip(batch, headers, strict=True):
            if crypto is not None:
                crypto(msg.value, reply)
            replies.append(await producer.send(topics.replies, reply, key=msg.key, headers=h))
        records = []
        for ack, h in zip(replies, headers, strict=True):
            await ack  # the record only once its reply is acknowledged, as the worker does
            records.append(
                await producer.send(
                    topics.settlement, record, key=shape.settlement_key, headers=h
                )
            )
        for ack in records:
            await ack
        entry[1] = True
        in_flight -= len(batch)
        done += len(batch)
        room.set()

    async def commit_loop() -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            offsets = ordered.offsets()
            if offsets:
                await consumer.commit(offsets)

    committer = asyncio.create_task(commit_loop())
    try:
        while done < len(messages):
            if in_flight >= MAX_IN_FLIGHT:
                room.clear()
                await room.wait()
                continue
            batches = await consumer.getmany(
                timeout_ms=100, max_records=MAX_IN_FLIGHT - in_flight
            )
            for tp, batch in batches.items():
                in_flight += len(batch)
                task = asyncio.create_task(answer(batch, ordered.admit(tp, batch[-1].offset + 1)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            for task in [t for t in tasks if t.done()]:
                task.result()
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        committer.cancel()
        await asyncio.gather(committer, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
    return await _measured(kafka, topics, len(messages))


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
    for i in range(repeats):
        run = await run_worker(bootstrap, hub, MODEL, messages, PARTITIONS, WINDOW, work)
        runs["worker"].append(run)
        shape = Shape(run.reply_bytes, run.record_bytes, run.records[0].key)
        runs["raw"].append(await run_raw(bootstrap, messages, PARTITIONS, shape))
        runs["floor"].append(await run_raw(bootstrap, messages, PARTITIONS, shape, crypto))
        print(
            f"  run {i + 1}/{repeats}: "
            + ", ".join(f"{side} {runs[side][-1].rps:,.0f} req/s" for side in SIDES),
            flush=True,
        )
    if profile is not None:
        await run_worker(
            bootstrap, hub, MODEL, messages, PARTITIONS, WINDOW, work, profile=profile
        )
    rps = {side: [r.rps for r in rs] for side, rs in runs.items()}
    med = {side: statistics.median(v) for side, v in rps.items()}
    last = runs["worker"][-1]
    return {
        "requests": n,
        "repeats": repeats,
        "partitions": PARTITIONS,
        "rps": rps,
        "rps_median": med,
        "span_s": {side: [r.span_s for r in rs] for side, rs in runs.items()},
        "worker_vs_raw_ratio": med["worker"] / med["raw"],
        "worker_vs_floor_ratio": med["worker"] / med["floor"],
        "floor_vs_raw_ratio": med["floor"] / med["raw"],
        "worker_vs_raw_per_run": _ratios(rps["worker"], rps["raw"]),
        "worker_vs_floor_per_run": _ratios(rps["worker"], rps["floor"]),
        "reply_bytes": last.reply_bytes,
        "record_bytes": last.record_bytes,
        "request_bytes": round(statistics.mean(len(v) for _, v in messages)),
        "settlement_key_bytes": len(last.records[0].key),
        "reply_headers": [k for k, _ in last.replies[0].headers],
    }


async def window_scaling(
    bootstrap: str, hub: Path, work: Path, windows: list[int], per_window: int
) -> list[dict[str, Any]]:
    out = []
    for window in windows:
        n = max(per_window, window * (per_window // 7))
        run = await run_worker(bootstrap, hub, "fixed-50", corpus(n, "fixed-50"), 1, window, work)
        ideal = window / 0.050
        out.append(
            {
                "window": window,
                "requests": n,
                "rps": run.rps,
                "ideal_rps": ideal,
                "efficiency": run.rps / ideal,
            }
        )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-bench-"))
    hub = work / "hub"
    await asyncio.to_thread(build_demo_hub, hub)
    add_fixed_latency_model(hub, "fixed-50", 50)
    with running_broker(log_dir=work) as broker:
        return {
            "smoke": args.smoke,
            "throughput": await throughput(
                broker.bootstrap, hub, work, args.n, args.repeats, args.profile
            ),
            "window_scaling_50ms": await window_scaling(
                broker.bootstrap, hub, work, args.windows, args.per_window
            ),
        }


def print_tables(results: dict[str, Any]) -> None:
    t = results["throughput"]
    print(
        f"\nWorker vs floors: demo-mlp, {t['requests']:,} requests per run, "
        f"{t['partitions']} partitions, {t['repeats']} runs (req/s, median (min-max))"
    )
    per_run = {"raw": t["worker_vs_raw_per_run"], "floor": t["worker_vs_floor_per_run"]}
    print(
        table(
            ["side", "req/s", "worker / side", "per run"],
            [
                ["worker", spread(t["rps"]["worker"]), "-", "-"],
                [
                    "raw aiokafka loop (floor A)",
                    spread(t["rps"]["raw"]),
                    f"{t['worker_vs_raw_ratio']:.3f}",
                    spread(per_run["raw"], "{:.3f}"),
                ],
                [
                    "raw loop + crypto (floor B)",
                    spread(t["rps"]["floor"]),
                    f"{t['worker_vs_floor_ratio']:.3f}",
                    spread(per_run["floor"], "{:.3f}"),
                ],
            ],
        )
    )
    print("\nWindow scaling: fixed 50 ms engine, one partition")
    rows = [
        [str(r["window"]), f"{r['rps']:.1f}", f"{r['ideal_rps']:.0f}", f"{r['efficiency']:.0%}"]
        for r in results["window_scaling_50ms"]
    ]
    print(table(["window", "req/s", "ideal", "efficiency"], rows))


def summary(results: dict[str, Any]) -> dict[str, Any]:
    t = results["throughput"]
    window64 = [r for r in results["window_scaling_50ms"] if r["window"] == WINDOW]
    return {
        "worker_rps": t["rps_median"]["worker"],
        "worker_vs_raw_ratio": t["worker_vs_raw_ratio"],
        "worker_vs_floor_ratio": t["worker_vs_floor_ratio"],
        "processes_2_speedup": None,  # no --processes worker option yet
        "window64_efficiency": window64[0]["efficiency"] if window64 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(parser)
    parser.add_argument("--n", type=int, default=30_000, help="requests per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument(
        "--per-window", type=int, default=210, help="requests per window-scaling run (x window/7)"
    )
    parser.add_argument("--profile", type=Path, help="profile one more worker run into this file")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeats, args.windows, args.per_window = 300, 1, [1, 64], 14
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["runtime_s"] = time.perf_counter() - started
    write_section(results_path(args), "intake", results, summary(results))
    print_tables(results)
    print(f"\nRuntime {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
