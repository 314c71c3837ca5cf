"""Cache and model-load counters, plus a listener hook for whoever exports metrics.

The cache and the loaded-model LRU report every event to one ``CacheMetrics``: it keeps
running totals (``CacheStats``, cheap to snapshot for a health endpoint or a test) and calls
each listener with the ``CacheEvent``. A Prometheus exporter is a listener that maps event
kinds to counters and histograms; nothing here imports a metrics library.

Events carry the model name and digest, never request data. Listeners run in the thread that
produced the event (often a worker thread, not the event loop) and must be quick and
thread-safe; an exception in one is logged by type and otherwise ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["CacheEvent", "CacheEventKind", "CacheListener", "CacheMetrics", "CacheStats"]

log = logging.getLogger(__name__)

CacheEventKind = Literal[
    "hit",  # a verified copy was already on the shared volume
    "miss",  # the model was fetched from the hub (size_bytes: bytes transferred)
    "corrupt",  # a cached copy or a finished download failed its digest and was discarded
    "evict",  # a model was removed from disk to stay under the budget (size_bytes: freed)
    "load",  # an engine was built from the cache (seconds: materialise + load)
    "unload",  # a loaded engine was dropped from the in-memory LRU
    "usage",  # the shared volume now holds size_bytes of models (after a fetch or eviction)
]


@dataclass(frozen=True)
class CacheEvent:
    kind: CacheEventKind
    model: str
    digest: str
    size_bytes: int = 0
    seconds: float = 0.0


CacheListener = Callable[[CacheEvent], None]


@dataclass
class CacheStats:
    """Running totals since the process started."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    bytes_downloaded: int = 0
    bytes_evicted: int = 0
    loads: int = 0
    load_seconds_total: float = 0.0
    unloads: int = 0


class CacheMetrics:
    """Thread-safe totals plus fan-out to listeners."""

    def __init__(self, listeners: tuple[CacheListener, ...] = ()) -> None:
        self._stats = CacheStats()
        self._listeners = list(listeners)
        self._lock = threading.Lock()

    def add_listener(self, listener: CacheListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def snapshot(self) -> CacheStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def record(self, event: CacheEvent) -> None:
        with self._lock:
            s = self._stats
            if event.kind == "hit":
                s.hits += 1
            elif event.kind == "miss":
                s.misses += 1
                s.bytes_downloaded += event.size_bytes
            elif event.kind == "corrupt":
                s.corrupt += 1
            elif event.kind == "evict":
                s.evictions += 1
                s.bytes_evicted += event.size_bytes
            elif event.kind == "load":
                s.loads += 1
                s.load_seconds_total += event.seconds
            else:
                s.unloads += 1
            listeners = tuple(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception as e:  # a broken exporter must not break model loading
                log.warning("cache listener failed", extra={"error_type": type(e).__name__})
