"""Prometheus metrics of one worker process, on a registry of its own.

Nothing is registered at import time: the composition root builds one ``WorkerMetrics`` (with
its own ``CollectorRegistry``) and hands it to the intake, the publisher, the model cache, the
LLM proxy and the prover, which call the methods below. ``infra.health.HealthServer`` serves
the registry on ``/metrics``.

Labels are bounded by construction and never carry user data: models are the worker's own
(request topics it subscribes to, configured models), modes and outcomes come from closed
enums, partitions from the assignment. A value outside a label's allowed set is counted under
``other`` rather than creating a new series. Request ids are never labels.

Requests are counted once each, when their answer is acknowledged by the broker::

    og_worker_requests_total{model, mode, outcome}   outcome: result | <error code> |
                                                     dead_letter | duplicate
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from infra.health import LabelGuard
from schemas.base import VerificationMode
from schemas.results import ErrorCode
from schemas.topics import MODEL_NAME_PATTERN

__all__ = ["OUTCOMES", "CacheEventLike", "WorkerMetrics"]

OUTCOMES: Final = frozenset({"result", "dead_letter", "duplicate", *(c.value for c in ErrorCode)})
MODES: Final = frozenset({"unknown", *(m.value for m in VerificationMode)})
"""Verification modes, and ``unknown`` for a message that is not a valid request."""
PUBLISH_KINDS: Final = frozenset({"reply", "dead_letter", "chunk", "proof"})
CACHE_TIERS: Final = frozenset({"disk", "memory"})

_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_MAX_CACHED_CHILDREN = 4096
_LOAD_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_PROOF_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class CacheEventLike(Protocol):
    """What ``on_cache_event`` reads from a cache event (``worker.modelstore.stats.CacheEvent``)."""

    @property
    def kind(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def seconds(self) -> float: ...


class WorkerMetrics:
    """Every metric a worker exports. Methods are cheap and thread-safe (the cache calls them
    from worker threads)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._model = LabelGuard(pattern=MODEL_NAME_PATTERN, limit=256)
        self._mode = LabelGuard(allowed=MODES)
        self._outcome = LabelGuard(allowed=OUTCOMES)
        self._kind = LabelGuard(allowed=PUBLISH_KINDS)
        self._tier = LabelGuard(allowed=CACHE_TIERS)
        self._provider = LabelGuard(pattern=r"[a-z0-9_-]{1,32}", limit=16)
        self._code = LabelGuard(allowed={c.value for c in ErrorCode})
        # Per-request paths look their labelled series up here first: prometheus_client's
        # labels() validates and locks on every call, which is most of a metric update's cost.
        self._children: dict[tuple[str, ...], Any] = {}

        # -- requests ------------------------------------------------------------------------
        self.requests = Counter(
            "og_worker_requests",
            "Requests answered (acknowledged by the broker), by outcome.",
            ["model", "mode", "outcome"],
            registry=r,
        )
        self.abandoned = Counter(
            "og_worker_requests_abandoned",
            "Requests given up on shutdown or revocation (redelivered to the next owner).",
            ["model"],
            registry=r,
        )
        self.publish_failures = Counter(
            "og_worker_publish_failures",
            "Answers the broker did not acknowledge; the worker stops for a restart.",
            registry=r,
        )
        self.queue_wait = Histogram(
            "og_worker_queue_wait_seconds",
            "From the record's timestamp to the start of its execution.",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference = Histogram(
            "og_worker_inference_seconds",
            "Pipeline time: execute, hash, sign (includes engine retries).",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.end_to_end = Histogram(
            "og_worker_end_to_end_seconds",
            "From the record's timestamp to the broker's acknowledgement of its answer.",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.publish = Histogram(
            "og_worker_publish_seconds",
            "Time to publish and get acknowledged (reply + settlement record, or dead letter).",
            ["kind"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.published = Counter(
            "og_worker_published_messages",
            "Messages published, by kind.",
            ["kind"],
            registry=r,
        )

        # -- intake window and lag -----------------------------------------------------------
        self.in_flight = Gauge(
            "og_worker_in_flight_requests",
            "Requests fetched and not yet answered (executing or awaiting acks).",
            registry=r,
        )
        self.executing = Gauge(
            "og_worker_executing_requests",
            "Requests holding a window slot (executing now).",
            registry=r,
        )
        self.window_size = Gauge(
            "og_worker_window_size_requests",
            "Execution window per partition (requests).",
            registry=r,
        )
        self.max_in_flight = Gauge(
            "og_worker_max_in_flight_requests",
            "Process-wide cap on requests in flight.",
            registry=r,
        )
        self.partition_in_flight = Gauge(
            "og_worker_partition_in_flight_requests",
            "Requests of one partition fetched and not yet answered (paused at 2x window).",
            ["topic", "partition"],
            registry=r,
        )
        self.partition_paused = Gauge(
            "og_worker_partition_paused",
            "1 while fetching from the partition is paused by backpressure.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "og_worker_consumer_lag_records",
            "Records in the partition not yet fetched: highwater - position.",
            ["topic", "partition"],
            registry=r,
        )

        # -- model cache ---------------------------------------------------------------------
        self.cache_hits = Counter("og_worker_cache_hits", "Model cache hits.", ["tier"], registry=r)
        self.cache_misses = Counter(
            "og_worker_cache_misses", "Model cache misses.", ["tier"], registry=r
        )
        self.cache_corrupt = Counter(
            "og_worker_cache_corrupt",
            "Cached or downloaded models that failed their digest and were discarded.",
            registry=r,
        )
        self.cache_evictions = Counter(
            "og_worker_cache_evictions", "Models evicted from the cache.", ["tier"], registry=r
        )
        self.cache_downloaded_bytes = Counter(
            "og_worker_cache_downloaded_bytes", "Bytes fetched from the model hub.", registry=r
        )
        self.cache_evicted_bytes = Counter(
            "og_worker_cache_evicted_bytes", "Bytes freed by evictions from disk.", registry=r
        )
        self.cache_size = Gauge(
            "og_worker_cache_size_bytes", "Bytes held in the shared model cache.", registry=r
        )
        self.cache_budget = Gauge(
            "og_worker_cache_budget_bytes", "Byte budget of the shared model cache.", registry=r
        )
        self.model_load = Histogram(
            "og_worker_model_load_seconds",
            "Time to make a model ready: materialise from the cache and load the engine.",
            ["model"],
            buckets=_LOAD_BUCKETS_S,
            registry=r,
        )
        self.engine_batch = Histogram(
            "og_worker_engine_batch_requests",
            "Requests a batching engine (vLLM) ran together, observed once per engine step.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge(
            "og_worker_model_loaded",
            "1 for each model this worker serves now.",
            ["model"],
            registry=r,
        )

        # -- LLM proxy -----------------------------------------------------------------------
        self.provider_errors = Counter(
            "og_worker_provider_errors",
            "Failed provider calls, by the error code they map to.",
            ["provider", "code"],
            registry=r,
        )
        self.provider_retries = Counter(
            "og_worker_provider_retries",
            "Provider calls retried (same or another endpoint).",
            ["provider"],
            registry=r,
        )
        self.provider_latency = Histogram(
            "og_worker_provider_request_seconds",
            "Provider call latency (successful calls).",
            ["provider"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )

        # -- ZKML proofs ---------------------------------------------------------------------
        self.proofs_queued = Counter(
            "og_worker_proofs_queued", "Proofs queued for generation.", ["model"], registry=r
        )
        self.proofs_published = Counter(
            "og_worker_proofs_published",
            "Proofs published on the settlement topic.",
            ["model"],
            registry=r,
        )
        self.proofs_failed = Counter(
            "og_worker_proofs_failed", "Proofs that could not be produced.", ["model"], registry=r
        )
        self.proofs_pending = Gauge(
            "og_worker_proofs_pending", "Proofs queued and not yet published.", registry=r
        )
        self.proof_seconds = Histogram(
            "og_worker_proof_seconds",
            "Proof generation time.",
            ["model"],
            buckets=_PROOF_BUCKETS_S,
            registry=r,
        )

        self.node = Info("og_worker_node", "Identity of this worker.", registry=r)

    # -- requests (intake) -------------------------------------------------------------------

    def _cached(self, key: tuple[str, ...], child: Any) -> Any:
        if len(self._children) < _MAX_CACHED_CHILDREN:
            self._children[key] = child
        return child

    def request_started(self, model: str, queue_wait_s: float) -> None:
        child = self._children.get(("wait", model))
        if child is None:
            child = self._cached(("wait", model), self.queue_wait.labels(self._model(model)))
        child.observe(max(0.0, queue_wait_s))

    def inference_done(self, model: str, seconds: float) -> None:
        child = self._children.get(("infer", model))
        if child is None:
            child = self._cached(("infer", model), self.inference.labels(self._model(model)))
        child.observe(seconds)

    def request_finished(
        self, model: str, mode: str, outcome: str, end_to_end_s: float | None
    ) -> None:
        """One request answered (or dropped as a duplicate: ``end_to_end_s`` None)."""
        key = ("req", model, mode, outcome)
        counter = self._children.get(key)
        if counter is None:
            labels = (self._model(model), self._mode(mode), self._outcome(outcome))
            counter = self._cached(key, self.requests.labels(*labels))
        counter.inc()
        if end_to_end_s is not None:
            child = self._children.get(("e2e", model))
            if child is None:
                child = self._cached(("e2e", model), self.end_to_end.labels(self._model(model)))
            child.observe(max(0.0, end_to_end_s))

    def request_abandoned(self, model: str) -> None:
        self.abandoned.labels(self._model(model)).inc()

    def publish_failed(self) -> None:
        self.publish_failures.inc()

    def message_published(self, kind: str, seconds: float | None = None) -> None:
        pair = self._children.get(("pub", kind))
        if pair is None:
            k = self._kind(kind)
            pair = self._cached(("pub", kind), (self.published.labels(k), self.publish.labels(k)))
        pair[0].inc()
        if seconds is not None:
            pair[1].observe(seconds)

    def track_intake(
        self,
        in_flight: Callable[[], float],
        executing: Callable[[], float],
        *,
        window_per_partition: int,
        max_in_flight: int,
    ) -> None:
        """Read the intake's counters at scrape time (no per-request gauge updates)."""
        self.in_flight.set_function(in_flight)
        self.executing.set_function(executing)
        self.window_size.set(window_per_partition)
        self.max_in_flight.set(max_in_flight)

    def set_partition(
        self, topic: str, partition: int, *, in_flight: int, paused: bool, lag: int | None
    ) -> None:
        labels = (topic, str(partition))
        self.partition_in_flight.labels(*labels).set(in_flight)
        self.partition_paused.labels(*labels).set(1 if paused else 0)
        if lag is not None:
            self.consumer_lag.labels(*labels).set(max(0, lag))

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's series so its last values do not linger."""
        labels = (topic, str(partition))
        for gauge in (self.partition_in_flight, self.partition_paused, self.consumer_lag):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    # -- model cache -------------------------------------------------------------------------

    def cache_hit(self, tier: str = "disk") -> None:
        self.cache_hits.labels(self._tier(tier)).inc()

    def cache_miss(self, tier: str = "disk", downloaded_bytes: int = 0) -> None:
        self.cache_misses.labels(self._tier(tier)).inc()
        if downloaded_bytes > 0:
            self.cache_downloaded_bytes.inc(downloaded_bytes)

    def cache_evicted(self, tier: str = "disk", freed_bytes: int = 0) -> None:
        self.cache_evictions.labels(self._tier(tier)).inc()
        if freed_bytes > 0:
            self.cache_evicted_bytes.inc(freed_bytes)

    def cache_discarded_corrupt(self) -> None:
        self.cache_corrupt.inc()

    def set_cache_size(self, size_bytes: int) -> None:
        self.cache_size.set(size_bytes)

    def set_cache_budget(self, budget_bytes: int) -> None:
        self.cache_budget.set(budget_bytes)

    def model_loaded(self, model: str, seconds: float) -> None:
        m = self._model(model)
        self.model_load.labels(m).observe(seconds)
        self.models_loaded.labels(m).set(1)

    def model_unloaded(self, model: str) -> None:
        self.models_loaded.labels(self._model(model)).set(0)

    def engine_step(self, model: str, running_requests: int) -> None:
        """One engine step ran ``running_requests`` together (``VLLMEngine.observe_batches``)."""
        child = self._children.get(("batch", model))
        if child is None:
            child = self._cached(("batch", model), self.engine_batch.labels(self._model(model)))
        child.observe(running_requests)

    def on_cache_event(self, event: CacheEventLike) -> None:
        """A ``worker.modelstore.stats.CacheListener``: maps the cache's events to metrics.

        Disk events (hit, miss, corrupt, evict) are the shared volume; ``load``/``unload``
        are the in-memory LRU of loaded engines."""
        kind = event.kind
        if kind == "hit":
            self.cache_hit("disk")
        elif kind == "miss":
            self.cache_miss("disk", event.size_bytes)
        elif kind == "corrupt":
            self.cache_discarded_corrupt()
        elif kind == "evict":
            self.cache_evicted("disk", event.size_bytes)
        elif kind == "load":
            self.cache_miss("memory")
            self.model_loaded(event.model, event.seconds)
        elif kind == "unload":
            self.cache_evicted("memory")
            self.model_unloaded(event.model)
        elif kind == "usage":
            self.set_cache_size(event.size_bytes)

    # -- LLM proxy ---------------------------------------------------------------------------

    def provider_error(self, provider: str, code: ErrorCode | str) -> None:
        value = code.value if isinstance(code, ErrorCode) else code
        self.provider_errors.labels(self._provider(provider), self._code(value)).inc()

    def provider_retry(self, provider: str) -> None:
        self.provider_retries.labels(self._provider(provider)).inc()

    def provider_call(self, provider: str, seconds: float) -> None:
        self.provider_latency.labels(self._provider(provider)).observe(seconds)

    # -- ZKML proofs -------------------------------------------------------------------------

    def proof_queued(self, model: str) -> None:
        self.proofs_queued.labels(self._model(model)).inc()
        self.proofs_pending.inc()

    def proof_published(self, model: str, seconds: float | None = None) -> None:
        m = self._model(model)
        self.proofs_published.labels(m).inc()
        self.proofs_pending.dec()
        self.published.labels("proof").inc()
        if seconds is not None:
            self.proof_seconds.labels(m).observe(seconds)

    def proof_failed(self, model: str) -> None:
        self.proofs_failed.labels(self._model(model)).inc()
        self.proofs_pending.dec()

    # -- identity ----------------------------------------------------------------------------

    def set_node(self, node_id: str, version: str) -> None:
        self.node.info({"node_id": node_id[:64], "version": version[:64]})
