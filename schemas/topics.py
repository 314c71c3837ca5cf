"""Topic names and Kafka header names: one place, used by every service and client.

All topics live under a namespace (default ``og``) so that several networks or test runs can
share one cluster without seeing each other's traffic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "DEFAULT_NAMESPACE",
    "HEADER_ATTEMPTS",
    "HEADER_ORIGINAL_OFFSET",
    "HEADER_ORIGINAL_PARTITION",
    "HEADER_ORIGINAL_TOPIC",
    "HEADER_REASON",
    "HEADER_SCHEMA_VERSION",
    "HEADER_TRACEPARENT",
    "MODEL_NAME_PATTERN",
    "TOPIC_NAME_PATTERN",
    "TopicSpec",
    "Topics",
    "standard_topics",
]

DEFAULT_NAMESPACE: Final = "og"
MODEL_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,62}$"
TOPIC_NAME_PATTERN: Final = r"^[A-Za-z0-9._-]{1,249}$"

HEADER_SCHEMA_VERSION: Final = "og-schema-version"
HEADER_TRACEPARENT: Final = "traceparent"
HEADER_REASON: Final = "og-reason"
HEADER_ORIGINAL_TOPIC: Final = "og-original-topic"
HEADER_ORIGINAL_PARTITION: Final = "og-original-partition"
HEADER_ORIGINAL_OFFSET: Final = "og-original-offset"
HEADER_ATTEMPTS: Final = "og-attempts"

_MODEL_RE = re.compile(MODEL_NAME_PATTERN)


@dataclass(frozen=True)
class Topics:
    """The topic names of one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.namespace):
            raise ValueError("namespace must be 1-64 characters of [A-Za-z0-9_-]")

    def infer(self, model: str) -> str:
        """Request topic of one model: ``<ns>.infer.<model>``."""
        if not _MODEL_RE.fullmatch(model):
            raise ValueError("model name must match " + MODEL_NAME_PATTERN)
        return f"{self.namespace}.infer.{model}"

    @property
    def infer_prefix(self) -> str:
        return f"{self.namespace}.infer."

    def model_of(self, topic: str) -> str | None:
        """The model named by a request topic, or None for any other topic."""
        if topic.startswith(self.infer_prefix):
            return topic[len(self.infer_prefix) :]
        return None

    def is_internal(self, topic: str) -> bool:
        """True for topics only the network writes (requests, settlement, DLQ, registry,
        published batches).

        A request may name any reply topic except these: otherwise a client could make a
        worker write into the settlement or registry streams."""
        return topic.startswith(self.infer_prefix) or topic in {
            self.settlement,
            self.dlq,
            self.registry,
            self.batches,
        }

    @property
    def replies(self) -> str:
        return f"{self.namespace}.replies"

    @property
    def settlement(self) -> str:
        return f"{self.namespace}.settlement"

    @property
    def dlq(self) -> str:
        return f"{self.namespace}.dlq"

    @property
    def registry(self) -> str:
        return f"{self.namespace}.registry"

    @property
    def batches(self) -> str:
        """Published batches (``schemas.batches``), compacted; key: the batch index."""
        return f"{self.namespace}.batches"


@dataclass(frozen=True)
class TopicSpec:
    """A topic as we want it: name, partition count, replication factor, topic configs."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: Mapping[str, str] = field(default_factory=dict)


def standard_topics(
    namespace: str,
    models: Sequence[str],
    *,
    request_partitions: int = 4,
    reply_partitions: int = 4,
    settlement_partitions: int = 4,
    replication_factor: int = 1,
    dlq_retention_ms: int | None = None,
) -> list[TopicSpec]:
    """The topics a deployment needs: one request topic per model plus the shared topics.

    ``{ns}.infer.{model}`` (``request_partitions``: as many as the largest worker group may
    have pods), ``{ns}.replies``, ``{ns}.settlement`` (as many as settlement consumers),
    ``{ns}.dlq`` (1), ``{ns}.registry`` (1, compacted: only the latest registration or
    heartbeat per node id matters) and ``{ns}.batches`` (1, compacted and never expired: one
    published batch per batch index, kept for as long as anyone may need to prove inclusion;
    compaction only drops a republished copy). The deployment manifests create exactly these
    (``inference-node topics ensure``), so code and deployment cannot disagree.
    """
    names = Topics(namespace)
    rf = replication_factor
    dlq = {"retention.ms": str(dlq_retention_ms)} if dlq_retention_ms is not None else {}
    specs = [TopicSpec(names.infer(m), request_partitions, rf) for m in models]
    specs += [
        TopicSpec(names.replies, reply_partitions, rf),
        TopicSpec(names.settlement, settlement_partitions, rf),
        TopicSpec(names.dlq, 1, rf, dlq),
        TopicSpec(names.registry, 1, rf, {"cleanup.policy": "compact"}),
        TopicSpec(names.batches, 1, rf, {"cleanup.policy": "compact", "retention.ms": "-1"}),
    ]
    return specs
