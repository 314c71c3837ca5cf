"""WorkerMetrics and SettlementMetrics: own registries, bounded labels, the right series move."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infra.health import LabelGuard
from schemas.results import ErrorCode
from settlement.metrics import SettlementMetrics
from worker.metrics import OUTCOMES, WorkerMetrics


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _requests(registry: CollectorRegistry, model: str, mode: str, outcome: str) -> float:
    return _value(registry, "og_worker_requests_total", model=model, mode=mode, outcome=outcome)


def _label_values(registry: CollectorRegistry, label: str) -> set[str]:
    text = generate_latest(registry).decode()
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if label in s.labels
    }


def test_each_instance_has_its_own_registry() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()  # a global registry would raise "Duplicated"
    a.request_finished("demo-mlp", "VANILLA", "result", 0.1)
    assert _requests(a.registry, "demo-mlp", "VANILLA", "result") == 1
    assert _requests(b.registry, "demo-mlp", "VANILLA", "result") == 0
    SettlementMetrics()
    SettlementMetrics()


def test_request_counters_and_histograms() -> None:
    m = WorkerMetrics(process_metrics=False)
    r = m.registry
    for _ in range(3):
        m.request_started("demo-lm", 0.02)
        m.inference_done("demo-lm", 0.005)
        m.request_finished("demo-lm", "VANILLA", "result", 0.03)
    m.request_finished("demo-lm", "TEE", ErrorCode.UNKNOWN_MODEL.value, 0.01)
    m.request_finished("demo-lm", "VANILLA", "duplicate", None)
    assert _requests(r, "demo-lm", "VANILLA", "result") == 3
    assert _requests(r, "demo-lm", "TEE", "unknown_model") == 1
    assert _requests(r, "demo-lm", "VANILLA", "duplicate") == 1
    # Duplicates were never answered: no end-to-end latency for them.
    assert _value(r, "og_worker_end_to_end_seconds_count", model="demo-lm") == 4
    assert _value(r, "og_worker_queue_wait_seconds_count", model="demo-lm") == 3
    assert _value(r, "og_worker_inference_seconds_count", model="demo-lm") == 3
    assert _value(r, "og_worker_inference_seconds_sum", model="demo-lm") == pytest.approx(0.015)
    # A negative wait (producer clock ahead of ours) is clamped, not a negative observation.
    m.request_started("demo-lm", -5.0)
    assert _value(r, "og_worker_queue_wait_seconds_bucket", model="demo-lm", le="0.001") == 1


def test_labels_stay_bounded() -> None:
    m = WorkerMetrics(process_metrics=False)
    for i in range(300):
        # A request id or a prompt passed by mistake as a label value must not become a series.
        m.request_finished(f"Prompt with spaces {i}", f"mode{i}", f"req-{i}", 0.1)
    for i in range(400):
        m.request_finished(f"model-{i}", "VANILLA", "result", 0.1)
    models = _label_values(m.registry, "model")
    assert "other" in models
    assert not any(" " in v for v in models)
    assert len(models) <= 257
    assert _label_values(m.registry, "mode") <= {"VANILLA", "TEE", "ZKML", "unknown", "other"}
    assert _label_values(m.registry, "outcome") <= OUTCOMES | {"other"}


def test_label_guard() -> None:
    guard = LabelGuard(allowed={"a", "b", "c"}, limit=2)
    assert [guard("a"), guard("b"), guard("c"), guard("zzz"), guard("a")] == [
        "a",
        "b",
        "other",
        "other",
        "a",
    ]
    patterned = LabelGuard(pattern=r"[a-z]+")
    assert patterned("abc") == "abc"
    assert patterned("ab c") == "other"


def test_partition_gauges_and_forgetting_a_revoked_partition() -> None:
    m = WorkerMetrics(process_metrics=False)
    m.set_partition("og.infer.demo-mlp", 0, in_flight=7, paused=True, lag=42)
    m.set_partition("og.infer.demo-mlp", 1, in_flight=0, paused=False, lag=None)
    r = m.registry
    labels = {"topic": "og.infer.demo-mlp", "partition": "0"}
    assert _value(r, "og_worker_consumer_lag_records", **labels) == 42
    assert _value(r, "og_worker_partition_paused", **labels) == 1
    assert _value(r, "og_worker_partition_in_flight_requests", **labels) == 7
    assert (
        r.get_sample_value(
            "og_worker_consumer_lag_records", {"topic": "og.infer.demo-mlp", "partition": "1"}
        )
        is None
    )  # unknown lag is absent, not 0
    m.forget_partition("og.infer.demo-mlp", 0)
    m.forget_partition("og.infer.demo-mlp", 5)  # never seen: no error
    assert r.get_sample_value("og_worker_consumer_lag_records", labels) is None


def test_intake_gauges_read_at_scrape_time() -> None:
    m = WorkerMetrics(process_metrics=False)
    state = {"in_flight": 3, "executing": 2}
    m.track_intake(
        lambda: state["in_flight"],
        lambda: state["executing"],
        window_per_partition=64,
        max_in_flight=256,
    )
    assert _value(m.registry, "og_worker_in_flight_requests") == 3
    state["in_flight"] = 9
    assert _value(m.registry, "og_worker_in_flight_requests") == 9
    assert _value(m.registry, "og_worker_window_size_requests") == 64


@dataclass(frozen=True)
class _Event:
    kind: str
    model: str
    digest: str = "ab" * 32
    size_bytes: int = 0
    seconds: float = 0.0


def test_cache_events_map_to_metrics() -> None:
    m = WorkerMetrics(process_metrics=False)
    for event in [
        _Event("miss", "demo-lm", size_bytes=1000),
        _Event("hit", "demo-lm"),
        _Event("hit", "demo-mlp"),
        _Event("load", "demo-lm", seconds=0.4),
        _Event("evict", "demo-mlp", size_bytes=300),
        _Event("corrupt", "demo-mlp"),
        _Event("unload", "demo-lm"),
        _Event("usage", "", size_bytes=5000),
    ]:
        m.on_cache_event(event)
    m.set_cache_budget(10_000)
    r = m.registry
    assert _value(r, "og_worker_cache_hits_total", tier="disk") == 2
    assert _value(r, "og_worker_cache_misses_total", tier="disk") == 1
    assert _value(r, "og_worker_cache_downloaded_bytes_total") == 1000
    assert _value(r, "og_worker_cache_evictions_total", tier="disk") == 1
    assert _value(r, "og_worker_cache_evictions_total", tier="memory") == 1
    assert _value(r, "og_worker_cache_evicted_bytes_total") == 300
    assert _value(r, "og_worker_cache_corrupt_total") == 1
    assert _value(r, "og_worker_model_load_seconds_count", model="demo-lm") == 1
    assert _value(r, "og_worker_model_loaded", model="demo-lm") == 0  # unloaded since
    assert _value(r, "og_worker_cache_size_bytes") == 5000
    assert _value(r, "og_worker_cache_budget_bytes") == 10_000


def test_provider_and_proof_metrics() -> None:
    m = WorkerMetrics(process_metrics=False)
    m.provider_error("openai", ErrorCode.RATE_LIMITED)
    m.provider_error("openai", "rate_limited")
    m.provider_error("anthropic", "sk-secret-looking value")  # not a code: bounded
    m.provider_retry("openai")
    m.provider_call("openai", 0.2)
    m.proof_queued("demo-mlp")
    m.proof_queued("demo-mlp")
    m.proof_published("demo-mlp", seconds=6.0)
    m.proof_failed("demo-mlp")
    r = m.registry
    assert _value(r, "og_worker_provider_errors_total", provider="openai", code="rate_limited") == 2
    assert _value(r, "og_worker_provider_errors_total", provider="anthropic", code="other") == 1
    assert _value(r, "og_worker_provider_retries_total", provider="openai") == 1
    assert _value(r, "og_worker_proofs_queued_total", model="demo-mlp") == 2
    assert _value(r, "og_worker_proofs_published_total", model="demo-mlp") == 1
    assert _value(r, "og_worker_proofs_failed_total", model="demo-mlp") == 1
    assert _value(r, "og_worker_proofs_pending") == 0
    assert _value(r, "og_worker_proof_seconds_count", model="demo-mlp") == 1


def test_publish_metrics_and_node_info() -> None:
    m = WorkerMetrics(process_metrics=False)
    m.message_published("reply", 0.003)
    m.message_published("chunk")
    m.message_published("dead_letter", 0.01)
    m.set_node("ab" * 32, "0.1.0")
    r = m.registry
    assert _value(r, "og_worker_published_messages_total", kind="chunk") == 1
    assert _value(r, "og_worker_publish_seconds_count", kind="reply") == 1
    assert _value(r, "og_worker_node_info", node_id="ab" * 32, version="0.1.0") == 1


def test_process_metrics_on_the_own_registry() -> None:
    m = WorkerMetrics()
    assert _value(m.registry, "process_resident_memory_bytes") > 0


def test_settlement_metrics() -> None:
    m = SettlementMetrics(process_metrics=False)
    m.settled(
        verified=10,
        inserted=8,
        rejected_reasons=["bad_signature", "bad_signature", "future_timestamp", "Weird Reason!"],
        write_s=0.02,
    )
    m.batch_built(8)
    m.batch_anchored(8, gas_used=120_000)
    m.anchor_failed()
    m.set_unbatched(3)
    m.set_lag({("og.settlement", 0): 5, ("og.settlement", 1): 0})
    m.set_lag({("og.settlement", 1): 2})  # partition 0 moved away: its series goes
    r = m.registry
    assert _value(r, "og_settlement_records_verified_total") == 10
    assert _value(r, "og_settlement_records_stored_total") == 8
    assert _value(r, "og_settlement_records_duplicate_total") == 2
    assert _value(r, "og_settlement_rejections_total", reason="bad_signature") == 2
    assert _value(r, "og_settlement_rejections_total", reason="future_timestamp") == 1
    assert _value(r, "og_settlement_rejections_total", reason="other") == 1
    assert _value(r, "og_settlement_consume_batch_records_sum") == 14
    assert _value(r, "og_settlement_ledger_write_seconds_count") == 1
    assert _value(r, "og_settlement_merkle_batch_records_sum") == 8
    assert _value(r, "og_settlement_batch_gas_sum") == 120_000
    assert _value(r, "og_settlement_anchored_batches_total") == 1
    assert _value(r, "og_settlement_anchor_failures_total") == 1
    assert _value(r, "og_settlement_unbatched_records") == 3
    assert (
        r.get_sample_value(
            "og_settlement_consumer_lag_records", {"topic": "og.settlement", "partition": "0"}
        )
        is None
    )
    assert (
        _value(r, "og_settlement_consumer_lag_records", topic="og.settlement", partition="1") == 2
    )
