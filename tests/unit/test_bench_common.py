"""The benchmarks' bookkeeping, without a broker: the results file's fixed ``summary``, the
raw loop's ordered commits and settlement keying, and the histogram quantiles of the latency
breakdown."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.common import SUMMARY_KEYS, summary_of, write_section
from bench.latency import _quantile, stages
from bench.rawloop import Shape, _Ordered


def test_summary_has_exactly_its_keys() -> None:
    got = summary_of({"worker_rps": 10.0, "stray": 1, "worker_vs_raw_ratio": "x", "x": None})
    assert list(got) == list(SUMMARY_KEYS)
    assert got["worker_rps"] == 10.0
    assert got["worker_vs_raw_ratio"] is None  # not a number: null
    assert summary_of(None) == dict.fromkeys(SUMMARY_KEYS)


def test_write_section_merges_the_summary_and_keeps_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps({"vllm": {"ratio": 0.9}, "summary": {"vllm_worker_vs_alone_ratio": 0.9}})
    )
    write_section(path, "intake", {"a": 1}, {"worker_rps": 5.0})
    document = json.loads(path.read_text())
    assert document["intake"] == {"a": 1} and document["vllm"] == {"ratio": 0.9}
    assert document["summary"]["worker_rps"] == 5.0
    assert document["summary"]["vllm_worker_vs_alone_ratio"] == 0.9
    assert set(document["summary"]) == set(SUMMARY_KEYS)
    with pytest.raises(ValueError, match="not summary keys"):
        write_section(path, "intake", {}, {"speedup": 2.0})
    write_section(None, "intake", {}, {})  # a smoke run without --results writes nothing


def test_ordered_commits_only_a_contiguous_answered_prefix() -> None:
    ordered = _Ordered()
    first, second = ordered.admit("p0", 10), ordered.admit("p0", 20)
    other = ordered.admit("p1", 5)
    second[1] = True
    other[1] = True
    assert ordered.committable() == {"p1": 5}  # p0's first batch is still unanswered
    first[1] = True
    assert ordered.committable() == {"p0": 20}
    assert ordered.committable() == {}


def _message(key: bytes, value: bytes) -> SimpleNamespace:
    return SimpleNamespace(key=key, value=value)


def test_shape_reads_the_workers_settlement_keying() -> None:
    record = json.dumps({"envelope": {"request_id": "r-1"}}).encode()
    replies = [_message(b"r-1", b"x" * 10), _message(b"r-2", b"x" * 20)]
    by_request = Shape.of(replies, [_message(b"r-1", record)])
    assert by_request.keying == "request_id" and by_request.settlement_key is None
    assert by_request.reply_bytes == 15 and by_request.record_bytes == len(record)
    by_node = Shape.of(replies, [_message(b"ab" * 32, record)])
    assert by_node.keying == "node_id" and by_node.settlement_key == b"ab" * 32


def test_quantiles_are_interpolated_in_cumulative_buckets() -> None:
    buckets = [(0.001, 0.0), (0.005, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert _quantile(buckets, 100, 0.5) == pytest.approx(0.005)
    assert _quantile(buckets, 100, 0.25) == pytest.approx(0.003)
    assert _quantile(buckets, 100, 0.99) == pytest.approx(0.0099)
    tail = [(0.25, 90.0), (float("inf"), 100.0)]
    assert _quantile(tail, 100, 0.99) == 0.25  # beyond the last finite bucket: its bound


def test_stages_are_the_difference_between_two_scrapes() -> None:
    def scrape(count: float, total: float, under_5ms: float) -> dict[str, dict[str, object]]:
        h = {"count": count, "sum": total, "buckets": {0.005: under_5ms, float("inf"): count}}
        return {"queue_wait": h, "pipeline": h, "publish": h, "end_to_end": h}

    got = stages(scrape(10, 0.1, 10), scrape(110, 0.6, 60))
    assert got["pipeline"]["count"] == 100
    assert got["pipeline"]["mean_ms"] == pytest.approx(5.0)
    assert got["pipeline"]["p50_ms"] == pytest.approx(5.0)
