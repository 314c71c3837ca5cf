"""Every benchmark module keeps working: each one's ``--smoke`` mode (tiny sizes) runs end to
end on the real broker (and, for settlement, PostgreSQL), prints its table and writes the
section ``bench/report.py`` reads, with the headline ``summary`` in its fixed shape (the fault
harness, ``bench/chaos.py``, writes its rows).

The smoke runs are processes started together (most of their time is spent waiting for
consumer-group joins and process start-up, so together they take about as long as the
slowest); each test waits for its own. Their figures mean nothing and are never kept: each
writes into a temporary results file. ``bench/vllm.py`` has its own smoke test in
tests/vllm (it needs the vLLM virtualenv).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.common import SUMMARY_KEYS
from bench.settlement import WORKER_KEYING

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240

BENCHES: dict[str, list[str]] = {
    "intake": ["--hub"],
    "processes": ["--hub"],
    "latency": ["--hub"],
    "settlement": [],
    "models": ["--hub"],
    "attestation": [],
    "zkml": ["--hub"],
    "chaos": [],
}
"""Module -> its options beyond ``--smoke`` and where its figures go (``--hub`` takes the
session's demo hub)."""


@dataclass
class Smoke:
    proc: subprocess.Popen[str]
    results: Path

    def wait(self) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            return -1, out
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def smokes(
    request: pytest.FixtureRequest, demo_hub: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Smoke]]:
    """The smoke runs of the benchmarks selected in this session, started together."""
    selected = {
        item.callspec.params["bench"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    tmp = tmp_path_factory.mktemp("bench-smoke")
    runs: dict[str, Smoke] = {}
    for bench in sorted(selected):
        results = tmp / f"{bench}.json"
        args = [sys.executable, "-m", f"bench.{bench}", "--smoke"]
        if "--hub" in BENCHES[bench]:
            args += ["--hub", str(demo_hub)]
        out_flag = {"zkml": "--json", "chaos": "--output"}.get(bench, "--results")
        args += [out_flag, str(results)]
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs[bench] = Smoke(proc, results)
    yield runs
    for smoke in runs.values():
        if smoke.proc.poll() is None:
            smoke.proc.kill()
            smoke.proc.communicate()


def _section(smoke: Smoke, name: str) -> dict[str, Any]:
    document = json.loads(smoke.results.read_text())
    assert set(document["summary"]) == set(SUMMARY_KEYS)
    assert all(v is None or isinstance(v, int | float) for v in document["summary"].values())
    section: dict[str, Any] = document[name]
    assert section["smoke"] is True
    return section


@pytest.mark.parametrize(
    "bench",
    [
        "intake",
        "processes",
        "latency",
        pytest.param("settlement", marks=pytest.mark.postgres),
        "models",
        "attestation",
        "zkml",
        "chaos",
    ],
)
def test_bench_smoke(bench: str, smokes: dict[str, Smoke]) -> None:
    rc, out = smokes[bench].wait()
    assert rc == 0, out[-4000:]
    assert "|---|" in out, out[-2000:]  # it printed its table
    smoke = smokes[bench]
    if bench == "zkml":
        rows = json.loads(smoke.results.read_text())
        assert rows and all(r["prove_s"] > 0 and r["worker_prove_s"] > 0 for r in rows)
        return
    if bench == "chaos":
        # Every scenario ran; nothing lost, no crash, every hostile case answered as the corpus
        # expects (the run exits non-zero otherwise, so this also checks what it wrote).
        rows = json.loads(smoke.results.read_text())["rows"]
        assert len(rows) >= 5
        assert all(r["sent"] > 0 for r in rows)
        assert all(r["lost"] == r["crashes"] == r["crash_loops"] == 0 for r in rows)
        corpus = next(r for r in rows if r["scenario"].startswith("hostile corpus"))
        assert corpus["notes"]["settlement_cases"] > 0 and not corpus["notes"]["mismatches"]
        return
    section = _section(smoke, bench)
    summary = json.loads(smoke.results.read_text())["summary"]
    if bench == "intake":
        t = section["throughput"]
        assert t["rps"]["worker"][0] > 0 and t["rps"]["raw"][0] > 0 and t["rps"]["floor"][0] > 0
        assert summary["worker_rps"] == t["rps_median"]["worker"]
        # The settlement benchmark keys its records as the worker really does.
        assert t["settlement_keying"] == WORKER_KEYING
    elif bench == "processes":
        assert all(section["rps"][side][0] > 0 for side in ("1", "2"))
        assert summary["processes_2_speedup"] == section["speedup"]
    elif bench == "latency":
        (config,) = section["configs"]
        assert config["worker_stages"]["pipeline"]["count"] > 0
        assert summary["added_latency_p50_ms"] == config["added_p50_ms"]
    elif bench == "settlement":
        assert section["verification"]["per_record_us"] > 0
        assert summary["settlement_records_per_s_sqlite"] > 0
    elif bench == "models":
        assert section["worker_rps"] > 0
    elif bench == "attestation":
        assert len(section["rows"]) >= 7
