"""Provision the node's Kafka topics through the admin API, idempotently.

Why this module exists: topics must exist with the right partition counts and configs before
workers subscribe. A Kafka-API broker that auto-creates topics (Tansu does, with 4 partitions
and no configs, whenever a client asks for metadata of an unknown topic) would otherwise hand
us a non-compacted registry or too few request partitions. :func:`ensure_topics` is safe to run
on every start-up: it creates what is missing, then checks what exists.

Broker behaviour this relies on (checked against Tansu 0.6.0 and aiokafka 0.14.0):

- CreateTopics for an existing topic does not raise; the response carries error code 36
  (TOPIC_ALREADY_EXISTS) for that topic, which we count as success (another process won).
- Tansu accepts specs Kafka would reject (0 partitions, replication factor 3 on one node,
  names with spaces) and answers error code 0, so specs are validated here first.
- ``describe_topics`` works, but it is a Metadata request with auto-creation on: describing a
  missing topic creates it. We only describe names that ``list_topics`` already returned.
- ``describe_configs`` works for topic configs.

Exceptions: :class:`ProvisioningError` for anything that leaves the topics unusable; aiokafka
errors are translated into it where they enter this module.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.admin.config_resource import (  # type: ignore[import-untyped]
    ConfigResource,
    ConfigResourceType,
)
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicSpec

__all__ = [
    "ProvisioningError",
    "delete_topics",
    "ensure_topics",
]

_TOPIC_ALREADY_EXISTS = 36
_LEGAL_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


class ProvisioningError(Exception):
    """Topics could not be created or do not match their specs."""


def _validate(specs: Sequence[TopicSpec]) -> None:
    seen: dict[str, TopicSpec] = {}
    for spec in specs:
        if not _LEGAL_TOPIC_NAME.fullmatch(spec.name) or spec.name in {".", ".."}:
            raise ProvisioningError(
                f"illegal topic name {spec.name!r}: use 1-249 of [A-Za-z0-9._-]"
            )
        if spec.partitions < 1 or spec.replication_factor < 1:
            raise ProvisioningError(
                f"topic {spec.name!r}: partitions and replication factor must be >= 1"
            )
        if seen.setdefault(spec.name, spec) != spec:
            raise ProvisioningError(f"topic {spec.name!r} is specified twice, differently")


@asynccontextmanager
async def _admin(cluster: str | KafkaSettings, timeout_s: float) -> AsyncIterator[Any]:
    settings = cluster if isinstance(cluster, KafkaSettings) else None
    bootstrap = settings.bootstrap_servers if settings is not None else str(cluster)
    options = settings.admin_kwargs() if settings is not None else {}
    admin = AIOKafkaAdminClient(
        **{**options, "bootstrap_servers": bootstrap},
        request_timeout_ms=max(1, int(timeout_s * 1000)),
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            yield admin
    except (KafkaError, OSError, TimeoutError) as e:
        raise ProvisioningError(f"Kafka admin request to {bootstrap} failed: {e!r}") from e
    finally:
        await admin.close()


async def ensure_topics(
    bootstrap: str | KafkaSettings, specs: Sequence[TopicSpec], *, timeout_s: float = 15.0
) -> list[str]:
    """Create the topics in ``specs`` that do not exist yet; return the names created.

    Idempotent: existing topics (including ones another process creates concurrently) are left
    alone. Afterwards every topic is checked to exist with at least the requested partition
    count and the requested configs. Raises :class:`ProvisioningError` on invalid specs, an
    unreachable broker, a per-topic creation error, or a topic that does not match its spec.
    """
    _validate(specs)
    unique = list({spec.name: spec for spec in specs}.values())
    async with _admin(bootstrap, timeout_s) as admin:
        existing = set(await admin.list_topics())
        missing = [spec for spec in unique if spec.name not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        s.name, s.partitions, s.replication_factor, topic_configs=dict(s.config)
                    )
                    for s in missing
                ]
            )
            failures = []
            for name, code, message, *_ in response.topic_errors:
                if code == 0:
                    created.append(str(name))
                elif code != _TOPIC_ALREADY_EXISTS:
                    failures.append(f"{name}: error {code} ({message})")
            if failures:
                raise ProvisioningError("could not create topics: " + "; ".join(failures))
        await _verify(admin, unique)
    return created


async def _verify(admin: Any, specs: Sequence[TopicSpec]) -> None:
    names = set(await admin.list_topics())
    absent = [s.name for s in specs if s.name not in names]
    if absent:
        raise ProvisioningError(f"topics missing after creation: {absent}")
    partition_counts: dict[str, int] = {}
    for topic in await admin.describe_topics([s.name for s in specs]):
        if topic["error_code"] != 0:
            raise ProvisioningError(
                f"cannot describe {topic['topic']}: error {topic['error_code']}"
            )
        partition_counts[topic["topic"]] = len(topic["partitions"])
    problems = [
        f"{s.name} has {partition_counts.get(s.name, 0)} partitions, wanted {s.partitions}"
        for s in specs
        if partition_counts.get(s.name, 0) < s.partitions
    ]
    with_config = [s for s in specs if s.config]
    if with_config:
        resources = [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in with_config]
        actual: dict[str, dict[str, str]] = {}
        for response in await admin.describe_configs(resources):
            for _code, _msg, _type, name, entries, *_ in response.resources:
                actual[str(name)] = {str(e[0]): str(e[1]) for e in entries}
        problems += [
            f"{s.name} config {key}={actual.get(s.name, {}).get(key)!r}, wanted {value!r}"
            for s in with_config
            for key, value in s.config.items()
            if actual.get(s.name, {}).get(key) != value
        ]
    if problems:
        raise ProvisioningError("topics do not match their specs: " + "; ".join(problems))


async def delete_topics(bootstrap: str, names: Sequence[str], *, timeout_s: float = 15.0) -> None:
    """Delete topics, ignoring ones that do not exist (best effort, for tests and resets).

    Raises :class:`ProvisioningError` only when the broker cannot be reached.
    """
    if not names:
        return
    async with _admin(bootstrap, timeout_s) as admin:
        await admin.delete_topics(list(names))
