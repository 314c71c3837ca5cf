"""The batch job API around a run: status and cancel of a job no run holds, and what a resume
refuses (another input file, a cancelled job, a job another run holds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from client.batch import BatchError, batch_status, cancel_batch, run_job
from client.batch.jobs import _job_lock
from client.batch.state import FinishedLine, JobState
from infra.kafka.memory import MemoryKafka
from schemas.topics import Topics
from tests.harness.batch import write_batch_file


def _job(tmp_path: Path) -> tuple[Path, Path]:
    batch = write_batch_file(tmp_path / "in.jsonl", ml=4, chat=0, invalid=1)
    job = tmp_path / "job"
    state = JobState.create(
        job,
        input_path=batch.path,
        input_bytes=batch.path.stat().st_size,
        input_sha256="00" * 32,
        total_lines=5,
        namespace="og",
        reply_to="og.replies",
    )
    with state:
        state.finish(
            [FinishedLine(1, "ml-0", "result", "x-1", "demo-mlp", reply="{}", verified=True)]
        )
    return batch.path, job


def test_status_counts_a_job_no_run_holds(tmp_path: Path) -> None:
    _, job = _job(tmp_path)
    status = batch_status(job)
    assert (status["lines"], status["finished"], status["not_sent"]) == (5, 1, 4)
    assert status["running"] is False and status["cancelled"] is False
    with _job_lock(job):
        assert batch_status(job)["running"] is True
    with pytest.raises(BatchError):
        batch_status(tmp_path / "nothing")


def test_cancel_without_a_run_writes_the_outputs_itself(tmp_path: Path) -> None:
    _, job = _job(tmp_path)
    assert cancel_batch(job) == {
        "cancelled": True,
        "running": False,
        "output": str(job / "output.jsonl"),
        "cancelled_lines": 4,
    }
    outcomes = [json.loads(x)["outcome"] for x in (job / "output.jsonl").read_text().splitlines()]
    assert outcomes == ["result"] + ["cancelled"] * 4
    assert batch_status(job)["cancelled"] is True


def test_cancel_while_a_run_holds_the_job_only_marks_it(tmp_path: Path) -> None:
    _, job = _job(tmp_path)
    with _job_lock(job):
        assert cancel_batch(job) == {"cancelled": True, "running": True}
    assert not (job / "output.jsonl").exists()


async def test_a_resume_refuses_another_file_a_cancelled_job_and_a_held_job(
    tmp_path: Path,
) -> None:
    path, job = _job(tmp_path)
    kafka, topics = MemoryKafka(), Topics("og")
    with pytest.raises(BatchError, match="not the one"):
        await run_job(path, job, kafka, topics)  # the recorded sha256 differs
    other = tmp_path / "job2"
    with _job_lock(other), pytest.raises(BatchError, match="another process"):
        await run_job(path, other, kafka, topics)
    fresh = tmp_path / "job3"
    JobState.create(
        fresh,
        input_path=path,
        input_bytes=path.stat().st_size,
        input_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        total_lines=5,
        namespace="og",
        reply_to="og.replies",
    ).mark_cancelled()
    with pytest.raises(BatchError, match="cancelled"):
        await run_job(path, fresh, kafka, topics)
