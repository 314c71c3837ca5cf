"""Intake benchmarks: worker throughput against a raw aiokafka loop, and window scaling.

Run with ``make bench`` (or ``python -m bench.intake``). Both sides run against the same real
broker in the same run. Throughput is measured from the reply topic's own record timestamps
(first to last reply), so the consumer-group join, which differs run to run, is excluded the
same way for both sides.

1. ``worker`` vs ``baseline``: N requests for the demo ONNX model (VANILLA), pre-produced to a
   4-partition topic. The worker runs its full path (decode, validate, ONNX, hash, sign, two
   acknowledged produces, ordered commits). The baseline is the least a correct consumer
   must do: consume the same requests, produce two messages of the worker's average reply and
   settlement-record sizes per request, wait for their acks, and commit each batch.
2. Window scaling: a fixed 50 ms engine on ONE partition; throughput divided by the ideal
   ``window / 50 ms`` shows how much in-partition concurrency intake delivers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from client import build_request
from infra.dev.broker import running_broker
from infra.dev.demo_models import add_fixed_latency_model, build_demo_hub
from infra.kafka import KafkaSettings
from infra.kafka.admin import ensure_topics
from schemas import MLInput, Tensor, Topics, encode
from schemas.topics import standard_topics
from worker.app import Worker, tune_gc
from worker.settings import WorkerSettings

RESULTS = Path(__file__).with_name("results.json")


def _kafka(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap, session_timeout_ms=3000, heartbeat_interval_ms=500
    )


def _payload(i: int) -> MLInput:
    return MLInput(
        tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[i % 13 / 7, 0.5, -1.0, 2.0])}
    )


async def _produce_requests(kafka: KafkaSettings, topics: Topics, model: str, n: int) -> None:
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        for i in range(n):
            request = build_request(model, _payload(i), reply_to=topics.replies)
            await producer.send(
                topics.infer(model), encode(request), key=request.request_id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def _collect(kafka: KafkaSettings, topic: str, n: int, timeout_s: float) -> list[Any]:
    """Wait until ``topic`` holds n messages; return them (with their timestamps)."""
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


def _rate(messages: list[Any]) -> float:
    stamps = sorted(m.timestamp for m in messages)
    span_s = (stamps[-1] - stamps[0]) / 1000
    return (len(stamps) - 1) / span_s if span_s > 0 else float("inf")


async def _namespace(bootstrap: str, models: list[str], partitions: int) -> Topics:
    ns = "b" + uuid.uuid4().hex[:10]
    await ensure_topics(bootstrap, standard_topics(ns, models, request_partitions=partitions))
    return Topics(ns)


async def run_worker(
    bootstrap: str, hub: Path, model: str, n: int, partitions: int, window: int, work: Path
) -> tuple[float, list[Any], list[Any]]:
    kafka = _kafka(bootstrap)
    topics = await _namespace(bootstrap, [model], partitions)
    await _produce_requests(kafka, topics, model, n)
    settings = WorkerSettings(
        namespace=topics.namespace,
        kafka=kafka,
        group_id=f"{topics.namespace}-w",
        models=[model],
        hub_dir=hub,
        cache_dir=work / "cache",
        key_dir=work / "keys",
        window_per_partition=window,
        max_in_flight=max(256, window * partitions),
    )
    worker = Worker(settings)
    await worker.setup()
    tune_gc()  # as `inference-node worker` does
    task = asyncio.create_task(worker.run())
    try:
        replies = await _collect(kafka, topics.replies, n, timeout_s=300)
        records = await _collect(kafka, topics.settlement, n, timeout_s=60)
    finally:
        worker.stop()
        await task
        await worker.close()
    return _rate(replies), replies, records


async def run_baseline(
    bootstrap: str, model: str, n: int, partitions: int, reply_bytes: int, record_bytes: int
) -> float:
    kafka = _kafka(bootstrap)
    topics = await _namespace(bootstrap, [model], partitions)
    await _produce_requests(kafka, topics, model, n)
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    consumer = AIOKafkaConsumer(
        topics.infer(model), **kafka.consumer_kwargs(f"{topics.namespace}-b")
    )
    await producer.start()
    await consumer.start()
    reply, record = b"r" * reply_bytes, b"s" * record_bytes
    done = 0
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=100, max_records=256)
            acks = []
            for records in batches.values():
                for msg in records:
                    acks.append(await producer.send(topics.replies, reply, key=msg.key))
                    acks.append(await producer.send(topics.settlement, record, key=b"node"))
            await asyncio.gather(*acks)
            if batches:
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batches.items()})
            done += sum(len(rs) for rs in batches.values())
    finally:
        await consumer.stop()
        await producer.stop()
    return _rate(await _collect(kafka, topics.replies, n, timeout_s=60))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-bench-"))
    hub = work / "hub"
    build_demo_hub(hub)
    add_fixed_latency_model(hub, "fixed-50", 50)
    results: dict[str, Any] = {}
    with running_broker(log_dir=work) as broker:
        worker_rates, baseline_rates = [], []
        for _ in range(args.repeats):
            rate, replies, records = await run_worker(
                broker.bootstrap, hub, "demo-mlp", args.n, 4, 64, work
            )
            worker_rates.append(rate)
            reply_bytes = int(statistics.mean(len(m.value) for m in replies))
            record_bytes = int(statistics.mean(len(m.value) for m in records))
            baseline_rates.append(
                await run_baseline(
                    broker.bootstrap, "demo-mlp", args.n, 4, reply_bytes, record_bytes
                )
            )
        w, b = statistics.median(worker_rates), statistics.median(baseline_rates)
        results["throughput"] = {
            "requests": args.n,
            "repeats": args.repeats,
            "worker_rps": worker_rates,
            "baseline_rps": baseline_rates,
            "worker_rps_median": w,
            "baseline_rps_median": b,
            "ratio": w / b,
            "reply_bytes": reply_bytes,
            "record_bytes": record_bytes,
        }
        scaling = []
        for window in args.windows:
            n = max(200, window * 30)
            rate, _, _ = await run_worker(broker.bootstrap, hub, "fixed-50", n, 1, window, work)
            ideal = window / 0.050
            scaling.append(
                {
                    "window": window,
                    "requests": n,
                    "rps": rate,
                    "ideal_rps": ideal,
                    "efficiency": rate / ideal,
                }
            )
        results["window_scaling_50ms"] = scaling
    return results


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (numbers right-aligned by the caller's formatting)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_tables(results: dict[str, Any]) -> None:
    t = results["throughput"]
    runs = {
        side: ", ".join(f"{r:.0f}" for r in t[f"{side}_rps"]) for side in ("worker", "baseline")
    }
    print(f"\nWorker vs raw aiokafka loop: demo-mlp, {t['requests']} requests, 4 partitions")
    print(
        table(
            ["side", "req/s (median)", "runs"],
            [
                ["worker", f"{t['worker_rps_median']:.0f}", runs["worker"]],
                ["baseline", f"{t['baseline_rps_median']:.0f}", runs["baseline"]],
                ["ratio", f"{t['ratio']:.2f}", "target >= 0.6, stretch 0.8"],
            ],
        )
    )
    print("\nWindow scaling: fixed 50 ms engine, one partition")
    rows = [
        [str(r["window"]), f"{r['rps']:.1f}", f"{r['ideal_rps']:.0f}", f"{r['efficiency']:.0%}"]
        for r in results["window_scaling_50ms"]
    ]
    print(table(["window", "req/s", "ideal", "efficiency"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing["intake"] = results
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print_tables(results)


if __name__ == "__main__":
    main()
