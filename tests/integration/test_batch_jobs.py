"""Batch jobs on the real broker: a 2,000-line mixed batch completes with one verified output
line per input line; a client SIGKILLed mid-run resumes with no duplicate and no gap; a
cancelled job stops and says so."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from client import InferenceClient
from client.batch import BatchOptions, run_job
from client.batch.jobs import ClientFactory
from client.batch.state import JobState
from infra.dev.broker import BrokerProcess
from infra.kafka.client import ClusterKafka
from infra.kafka.ports import Kafka
from infra.kafka.settings import KafkaSettings
from schemas.topics import Topics
from tests.harness.admission import AdmissionFile
from tests.harness.batch import SECRET, BatchFile, write_batch_file
from tests.harness.support import read_topic
from worker.app import Worker

pytestmark = pytest.mark.kafka

ML, CHAT, INVALID, BAD_SHAPE = 1400, 500, 100, 20
VERIFY_SAMPLE = 20


def _client_kafka(bootstrap: str) -> KafkaSettings:
    # Tansu answers a waiting fetch only when fetch_max_wait_ms runs out (FIELD-NOTES).
    return KafkaSettings(bootstrap_servers=bootstrap, fetch_max_wait_ms=20)


def _cli_env(namespace: str, admission: AdmissionFile) -> dict[str, str]:
    return {
        **os.environ,
        "OG_CLIENT_NAMESPACE": namespace,
        "OG_CLIENT_KAFKA__FETCH_MAX_WAIT_MS": "20",
        **admission.env("OG_CLIENT_"),
    }


def _client(admission: AdmissionFile) -> ClientFactory:
    def build(kafka: Kafka, topics: Topics, reply_to: str) -> InferenceClient:
        return InferenceClient(kafka, topics, reply_to, admission=admission.settings())

    return build


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nodecli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _outputs(job_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job_dir / "output.jsonl").read_text().splitlines()]


def _check_complete(batch: BatchFile, out: list[dict[str, Any]]) -> None:
    """One output line per input line, in order, each with the outcome it must have."""
    assert [o["line"] for o in out] == list(range(1, len(batch.expected) + 1))
    got = {
        o["line"]: o["outcome"] if o["outcome"] != "error" else f"error:{o['error']['code']}"
        for o in out
    }
    assert got == batch.expected
    results = [o for o in out if o["outcome"] == "result"]
    assert all(o["verification"] == {"verified": True, "failed_checks": []} for o in results)
    invalid = [o for o in out if o["outcome"] == "invalid_line"]
    assert all(o["error"]["message"].startswith(f"line {o['line']}: ") for o in invalid)
    assert not any(SECRET in json.dumps(o["error"]) for o in out if o["error"])


async def _verify_sample(
    out: list[dict[str, Any]], tmp_path: Path, admission: AdmissionFile
) -> None:
    """``inference-node verify`` on a sample of result lines (ML and chat)."""
    results = [o for o in out if o["outcome"] == "result"]
    sample = random.Random(3).sample(results, VERIFY_SAMPLE)
    assert {o["model"] for o in sample} == {"demo-mlp", "demo-lm"}
    gate = asyncio.Semaphore(4)

    async def verify(o: dict[str, Any]) -> tuple[int, str]:
        reply, request = tmp_path / f"{o['line']}.reply.json", tmp_path / f"{o['line']}.req.json"
        reply.write_text(json.dumps(o["response"]))
        request.write_text(json.dumps(o["request"]))
        async with gate:
            rc, stdout, _ = await _cli(
                "verify", str(reply), "--request", str(request), *admission.verify_args()
            )
        return rc, stdout

    for rc, stdout in await asyncio.gather(*(verify(o) for o in sample)):
        assert rc == 0, stdout
        assert stdout.strip().endswith("verified")


async def test_a_mixed_batch_completes_with_one_verified_line_per_input(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    tmp_path: Path,
    admission: AdmissionFile,
) -> None:
    batch = write_batch_file(
        tmp_path / "in.jsonl", ml=ML, chat=CHAT, invalid=INVALID, bad_shape=BAD_SHAPE
    )
    job = tmp_path / "job"
    started = time.monotonic()
    summary = await run_job(
        batch.path,
        job,
        ClusterKafka(_client_kafka(broker.bootstrap)),
        Topics(namespace),
        options=BatchOptions(max_in_flight=256, timeout_s=60),
        client_factory=_client(admission),
    )
    wall_s = time.monotonic() - started
    total = ML + CHAT + INVALID
    print(f"\nbatch of {total} lines: {wall_s:.2f} s, {total / wall_s:.0f} lines/s")

    assert summary["status"] == "completed" and summary["lines"] == total
    assert summary["outcomes"] == {
        "result": ML - BAD_SHAPE + CHAT,
        "error": BAD_SHAPE,
        "invalid_line": INVALID,
        "timeout": 0,
        "cancelled": 0,
    }
    assert summary["errors"] == {"bad_request": BAD_SHAPE}
    assert summary["verified"] == ML - BAD_SHAPE + CHAT and summary["not_verified"] == 0
    assert summary["tokens"]["output"] > 0 and summary["tokens"]["input"] > 0
    assert summary["failures"]["lines"] == BAD_SHAPE + INVALID
    out = _outputs(job)
    _check_complete(batch, out)
    failures = (job / "failures.jsonl").read_bytes().splitlines()
    raw = batch.path.read_bytes().splitlines()
    assert failures == [raw[o["line"] - 1] for o in out if o["outcome"] != "result"]
    await _verify_sample(out, tmp_path, admission)

    # Submitting the finished job again sends nothing and writes the same outputs.
    again = await run_job(
        batch.path,
        job,
        ClusterKafka(_client_kafka(broker.bootstrap)),
        Topics(namespace),
        client_factory=_client(admission),
    )
    assert again["run"]["finished"] == 0 and again["outcomes"] == summary["outcomes"]
    assert _outputs(job) == out


async def _wait_finished(job: Path, at_least: int, proc: asyncio.subprocess.Process) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.returncode is None, "the batch ended before it was interrupted"
        if JobState.exists(job):
            with JobState.open(job) as state:
                finished = int(state.counts()["finished"])
            if finished >= at_least:
                return finished
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} lines finished in time")


async def _start_submit(
    batch: BatchFile,
    job: Path,
    broker: BrokerProcess,
    namespace: str,
    admission: AdmissionFile,
    *extra: str,
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nodecli.main",
        "batch",
        "submit",
        str(batch.path),
        "--out",
        str(job),
        "--bootstrap",
        broker.bootstrap,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_cli_env(namespace, admission),
    )


async def test_a_killed_client_resumes_with_no_duplicate_and_no_gap(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    tmp_path: Path,
    admission: AdmissionFile,
) -> None:
    batch = write_batch_file(
        tmp_path / "in.jsonl", ml=ML, chat=CHAT, invalid=INVALID, bad_shape=BAD_SHAPE
    )
    job = tmp_path / "job"
    total = ML + CHAT + INVALID
    proc = await _start_submit(batch, job, broker, namespace, admission)
    at_kill = await _wait_finished(job, total // 2, proc)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    with JobState.open(job) as state:
        counts = state.counts()
    assert at_kill <= counts["finished"] < total, counts
    assert not (job / "output.jsonl").exists()

    rc, stdout, stderr = await _cli(
        "batch", "submit", str(batch.path), "--out", str(job), "--bootstrap", broker.bootstrap,
        env=_cli_env(namespace, admission),
    )  # fmt: skip
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "completed"
    assert summary["run"]["finished"] == total - counts["finished"]
    assert summary["outcomes"]["timeout"] == 0 and summary["outcomes"]["cancelled"] == 0
    print(f"\nkilled at {counts['finished']} finished, {counts['in_flight']} in flight; "
          f"resumed: {summary['run']}")  # fmt: skip
    # Progress went to stderr as plain lines (not a terminal), with no prompt in it.
    assert f"batch: {total}/{total} (100%)" in stderr
    assert SECRET not in stderr and SECRET not in stdout

    out = _outputs(job)
    _check_complete(batch, out)
    # No duplicate: the worker answered every request id of this job exactly once.
    job_id = JobState.open(job).info.job_id
    answers = Counter(
        json.loads(m.value)["request_id"]
        for m in await read_topic(broker.bootstrap, Topics(namespace).replies)
        if json.loads(m.value)["type"] in ("result", "error")
    )
    ours = {rid: n for rid, n in answers.items() if rid.startswith(f"{job_id}-")}
    assert len(ours) == total - INVALID
    assert set(ours.values()) == {1}
    await _verify_sample(out, tmp_path, admission)


async def test_cancel_stops_a_running_job_and_status_reports_it(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    tmp_path: Path,
    admission: AdmissionFile,
) -> None:
    batch = write_batch_file(tmp_path / "in.jsonl", ml=600, chat=0, invalid=0)
    job = tmp_path / "job"
    proc = await _start_submit(batch, job, broker, namespace, admission, "--max-in-flight", "2")
    await _wait_finished(job, 50, proc)
    rc, stdout, _ = await _cli("batch", "cancel", str(job))
    assert rc == 0 and json.loads(stdout) == {"cancelled": True, "running": True}
    stdout_b, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    summary = json.loads(stdout_b)
    assert summary["status"] == "cancelled" and summary["outcomes"]["cancelled"] > 0
    assert sum(summary["outcomes"].values()) == 600

    out = _outputs(job)
    assert [o["line"] for o in out] == list(range(1, 601))
    cancelled = [o for o in out if o["outcome"] == "cancelled"]
    assert len(cancelled) == summary["outcomes"]["cancelled"]
    assert all(o["error"]["retryable"] for o in cancelled)
    assert len((job / "failures.jsonl").read_bytes().splitlines()) == len(cancelled)

    rc, stdout, _ = await _cli("batch", "status", str(job))
    status = json.loads(stdout)
    assert rc == 0 and status["cancelled"] and not status["running"]
    assert status["lines"] == 600 and status["finished"] == 600 - len(cancelled)
    rc, _, stderr = await _cli(
        "batch", "submit", str(batch.path), "--out", str(job), "--bootstrap", broker.bootstrap,
        env=_cli_env(namespace, admission),
    )  # fmt: skip
    assert rc == 2 and "cancelled" in stderr
