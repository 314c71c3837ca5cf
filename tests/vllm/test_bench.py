"""``bench/vllm.py`` keeps working: its smoke mode (tiny sizes) runs both sides end to end and
writes the figures ``bench/report.py`` reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.vllm import vllm_env

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_measures_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "vllm.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.vllm", "--smoke", "--json", str(out)],
        cwd=ROOT,
        env=vllm_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| worker / alone (tokens/s) |" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True and figures["requests"] == 16
    for side, runs in (("worker", 1), ("alone", 2)):  # alone before and after the worker
        assert figures[side]["tokens_per_s"] > 0
        assert 0 < figures[side]["ttft_p50_ms"] <= figures[side]["ttft_p99_ms"]
        assert len(figures[side]["runs"]) == runs
        assert all(0 < run["output_tokens"] <= 16 * 16 for run in figures[side]["runs"])
    assert figures["ratio"] == figures["worker"]["tokens_per_s"] / figures["alone"]["tokens_per_s"]
    assert figures["engine_args"]["max_num_seqs"] == 256
