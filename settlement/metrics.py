"""Prometheus metrics of the settlement service, on a registry of its own.

Built by the composition root (never at import time) and served by
``infra.health.HealthServer``. Labels are bounded: rejection reasons are the short codes of
``schemas.verify.record.Rejected`` (anything else counts as ``other``); no request or node id is
ever a label.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from infra.health import LabelGuard

__all__ = ["SettlementMetrics"]

_WRITE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 100_000)
_GAS_BUCKETS = (
    50_000,
    75_000,
    100_000,
    150_000,
    200_000,
    300_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
)


class SettlementMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._reason = LabelGuard(pattern=r"[a-z][a-z0-9_]{0,39}", limit=32)

        self.verified = Counter(
            "og_settlement_records_verified",
            "Records whose signature and fields verified (new or duplicate).",
            registry=r,
        )
        self.stored = Counter(
            "og_settlement_records_stored", "Verified records new to the ledger.", registry=r
        )
        self.duplicates = Counter(
            "og_settlement_records_duplicate",
            "Verified records already in the ledger (redeliveries).",
            registry=r,
        )
        self.rejections = Counter(
            "og_settlement_rejections", "Records rejected, by reason.", ["reason"], registry=r
        )
        self.consume_batch = Histogram(
            "og_settlement_consume_batch_records",
            "Records per ledger transaction.",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.ledger_write = Histogram(
            "og_settlement_ledger_write_seconds",
            "Time of one ledger transaction (verified records + rejections).",
            buckets=_WRITE_BUCKETS_S,
            registry=r,
        )
        self.merkle_batch = Histogram(
            "og_settlement_merkle_batch_records",
            "Records per Merkle batch.",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_gas = Histogram(
            "og_settlement_batch_gas",
            "Gas used to anchor one batch root.",
            buckets=_GAS_BUCKETS,
            registry=r,
        )
        self.anchored = Counter(
            "og_settlement_anchored_batches", "Batches anchored on chain.", registry=r
        )
        self.anchored_records = Counter(
            "og_settlement_anchored_records", "Records in anchored batches.", registry=r
        )
        self.anchor_failures = Counter(
            "og_settlement_anchor_failures",
            "Anchoring attempts that failed (the batch stays built and is retried).",
            registry=r,
        )
        self.unbatched = Gauge(
            "og_settlement_unbatched_records",
            "Records in the ledger waiting for a Merkle batch.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "og_settlement_consumer_lag_records",
            "Settlement records not yet fetched: highwater - position.",
            ["topic", "partition"],
            registry=r,
        )

    def settled(
        self,
        *,
        verified: int,
        inserted: int,
        rejected_reasons: Iterable[str],
        write_s: float,
        replays: int = 0,
    ) -> None:
        """One ledger transaction: ``verified`` records of which ``inserted`` were new and
        ``replays`` came again in another message (counted among ``rejected_reasons``)."""
        reasons = list(rejected_reasons)
        self.verified.inc(verified)
        self.stored.inc(inserted)
        self.duplicates.inc(max(0, verified - inserted - replays))
        for reason in reasons:
            self.rejections.labels(self._reason(reason)).inc()
        self.consume_batch.observe(verified + len(reasons))
        self.ledger_write.observe(write_s)

    def batch_built(self, records: int) -> None:
        self.merkle_batch.observe(records)

    def batch_anchored(self, records: int, gas_used: int) -> None:
        self.anchored.inc()
        self.anchored_records.inc(records)
        self.batch_gas.observe(gas_used)

    def anchor_failed(self) -> None:
        self.anchor_failures.inc()

    def set_unbatched(self, records: int) -> None:
        self.unbatched.set(records)

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Replace the lag series with ``lags`` ((topic, partition) -> records)."""
        self.consumer_lag.clear()
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic, str(partition)).set(max(0, lag))
