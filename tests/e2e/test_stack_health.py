"""The local stack is checkable: after ``stack up`` its services answer ``/readyz``, so
``inference-node check`` passes, and ``stack status`` reports each service's readiness (with the
failing checks' names when one is not ready)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from infra.dev.broker import free_port, stop_broker

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def _cli(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodecli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ),
        check=False,
    )


def _status(stack: list[str]) -> tuple[int, dict[str, Any]]:
    done = _cli("stack", "status", *stack)
    return done.returncode, json.loads(done.stdout)


def test_stack_up_serves_readyz_and_status_reports_readiness(tmp_path: Path) -> None:
    ports = {
        "--port": free_port(),
        "--chain-port": free_port(),
        "--worker-metrics-port": free_port(),
        "--settlement-metrics-port": free_port(),
    }
    state = tmp_path / "var"
    stack = ["--state-dir", str(state)] + [str(x) for kv in ports.items() for x in kv]
    worker_url = f"http://127.0.0.1:{ports['--worker-metrics-port']}/readyz"
    settlement_url = f"http://127.0.0.1:{ports['--settlement-metrics-port']}/readyz"
    up = _cli("stack", "up", *stack)
    try:
        assert up.returncode == 0, up.stderr
        printed = json.loads(up.stdout)
        assert printed["worker"]["readyz"] == worker_url
        assert printed["settlement"]["readyz"] == settlement_url
        assert printed["worker"]["metrics"].endswith(f":{ports['--worker-metrics-port']}/metrics")

        for url in (worker_url, settlement_url):
            checked = _cli("check", "--url", url)
            assert checked.returncode == 0, (url, checked.stdout, checked.stderr)
            assert json.loads(checked.stdout)["status"] == "ready"

        rc, status = _status(stack)
        assert rc == 0, status
        for service, url in (("worker", worker_url), ("settlement", settlement_url)):
            assert status[service]["ready"] is True and status[service]["running"] is True
            assert status[service]["readyz"] == url and "failed" not in status[service]

        # Take the broker away: the worker stays up but is not ready, and says why.
        assert stop_broker(state / "run" / "broker.pid")
        deadline = time.monotonic() + 30
        while True:
            rc, status = _status(stack)
            if not status["worker"]["ready"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert rc == 1
        assert status["worker"]["ready"] is False and status["broker"]["ready"] is False
        assert status["worker"]["failed"], status["worker"]
        if status["worker"]["running"]:
            assert "broker_reachable" in status["worker"]["failed"], status["worker"]
        assert _cli("check", "--url", worker_url).returncode == 1
    finally:
        down = _cli("stack", "down", *stack)
    assert down.returncode == 0, down.stderr
    rc, status = _status(stack)
    assert rc == 1
    assert status["worker"] == {
        "pid": None,
        "running": False,
        "ready": False,
        "readyz": worker_url,
        "metrics": worker_url.replace("/readyz", "/metrics"),
        "failed": ["not running"],
    }
