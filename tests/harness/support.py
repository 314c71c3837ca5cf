"""Helpers for tests that talk to the real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka import KafkaSettings


def fast_kafka(bootstrap: str) -> KafkaSettings:
    """Short group timeouts: joins take ~2 s instead of ~5 s on Tansu (see FIELD-NOTES)."""
    return KafkaSettings(
        bootstrap_servers=bootstrap, session_timeout_ms=3000, heartbeat_interval_ms=500
    )


async def read_topic(bootstrap: str, topic: str, *, idle_s: float = 1.0) -> list[Any]:
    """Every message on ``topic`` from the beginning, until nothing new arrives for idle_s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        messages: list[Any] = []
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000))
            if not batch:
                return messages
            for records in batch.values():
                messages.extend(records)
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout_s: float = 30.0
) -> None:
    """Poll ``check`` until it holds; fail with a clear message otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.1)


async def register_node(
    bootstrap: str,
    registry_topic: str,
    node: Any,
    *,
    models: Any = ("demo-mlp",),
    heartbeat_interval_s: float = 3600.0,
    **registration: Any,
) -> None:
    """Publish a valid registration for ``node`` (a ``tests.harness.nodes.TestNode``), as a
    worker would; settlement accepts its records once the authority admits it too. ``models``
    and the rest as ``TestNode.registration`` takes them; a long heartbeat interval keeps it
    fresh for the whole test."""
    from aiokafka import AIOKafkaProducer

    key, value = node.registration_message(
        models=models, heartbeat_interval_s=heartbeat_interval_s, **registration
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(registry_topic, value, key=key)
    finally:
        await producer.stop()


def settlement_rejections(service: Any) -> dict[str, float]:
    """A running ``SettlementService``'s rejected record counts by reason (its own metrics)."""
    return {
        sample.labels["reason"]: sample.value
        for metric in service.metrics.registry.collect()
        if metric.name == "og_settlement_rejections"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.value
    }


def settlement_counts(service: Any) -> dict[str, float]:
    """What a running ``SettlementService`` has done, read from its own metrics registry:
    ``verified``, ``stored`` and ``rejected`` record counts."""
    registry = service.metrics.registry
    rejected = sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "og_settlement_rejections"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    return {
        "verified": registry.get_sample_value("og_settlement_records_verified_total") or 0.0,
        "stored": registry.get_sample_value("og_settlement_records_stored_total") or 0.0,
        "rejected": rejected,
    }
