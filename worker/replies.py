"""Which reply topics a request may name, and whether they exist.

Anyone who can write a request topic chooses its ``reply_to``. A worker must never write into
another client's reply topic, into any namespace's internal topics (settlement, registry, DLQ,
requests) or Kafka's own (``__consumer_offsets``), and never create a topic (a broker that
auto-creates topics would create one per hostile request). So a request may name only:

- nothing, or the namespace's shared replies topic (``<ns>.replies``);
- a topic under a prefix the deployment allows (default ``<ns>.replies.``: a client at scale
  gets ``<ns>.replies.<client>``, created by the operator), that exists.

Existence is looked up in the cluster's metadata without naming the topic (no auto-creation),
cached: a topic once seen stays known, an unknown one is looked up again after a few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from schemas.topics import Topics

__all__ = ["ReplyTopics", "TopicDirectory"]

_RECHECK_MISSING_S = 5.0


class TopicDirectory:
    """Answers "does this topic exist?" from cluster metadata, with a cache."""

    def __init__(
        self,
        partitions_for: Callable[[str], Awaitable[set[int]]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._partitions_for = partitions_for
        self._clock = clock
        self._known: set[str] = set()
        self._missing: dict[str, float] = {}

    async def exists(self, topic: str) -> bool:
        if topic in self._known:
            return True
        checked = self._missing.get(topic)
        if checked is not None and self._clock() - checked < _RECHECK_MISSING_S:
            return False
        if await self._partitions_for(topic):
            self._known.add(topic)
            self._missing.pop(topic, None)
            return True
        if len(self._missing) > 10_000:
            self._missing.clear()
        self._missing[topic] = self._clock()
        return False


class ReplyTopics:
    def __init__(
        self,
        topics: Topics,
        prefixes: Sequence[str] | None = None,
        directory: TopicDirectory | None = None,
    ) -> None:
        self._topics = topics
        self._prefixes = tuple(prefixes) if prefixes is not None else (f"{topics.replies}.",)
        self._directory = directory

    async def refusal(self, reply_to: str | None) -> str | None:
        """Why ``reply_to`` may not be written to, or None. Reasons name the rule only."""
        if reply_to is None or reply_to == self._topics.replies:
            return None
        if reply_to.startswith("__") or self._topics.is_internal(reply_to):
            return "the reply topic is an internal topic"
        if not reply_to.startswith(self._prefixes):
            return "the reply topic is not one this deployment allows"
        if self._directory is not None and not await self._directory.exists(reply_to):
            return "the reply topic does not exist"
        return None
