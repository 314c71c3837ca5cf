"""Batch jobs as a producer runs them: ``submit`` (start or resume), ``status``, ``cancel``.

A job lives in one directory: ``state.sqlite3`` (``client.batch.state``), ``output.jsonl`` and
``failures.jsonl`` (``client.batch.outputs``), and ``lock``, held by the one run that may
write the state (a second ``submit`` of the same job is refused while the first runs).
``submit`` on a directory that holds a job resumes it, after checking that the input file is
the same (size and sha256) and so are the namespace and reply topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from client.batch.outputs import FAILURES_FILE, OUTPUT_FILE, write_outputs
from client.batch.progress import Progress
from client.batch.runner import BatchError, BatchOptions, BatchRun
from client.batch.state import JobState
from client.settings import ClientSettings
from client.transport import InferenceClient
from infra.kafka.client import ClusterKafka
from infra.kafka.ports import Kafka
from schemas.topics import Topics

__all__ = ["ClientFactory", "batch_status", "cancel_batch", "run_job", "submit_batch"]

LOCK_FILE = "lock"
ClientFactory = Callable[[Kafka, Topics, str], InferenceClient]
_OUTCOMES = ("result", "error", "invalid_line", "timeout", "cancelled")


@contextlib.contextmanager
def _job_lock(job_dir: Path) -> Iterator[None]:
    job_dir.mkdir(parents=True, exist_ok=True)
    with (job_dir / LOCK_FILE).open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchError(f"the job in {job_dir} is being run by another process") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _running(job_dir: Path) -> bool:
    try:
        with _job_lock(job_dir):
            return False
    except BatchError:
        return True


def _fingerprint(path: Path) -> tuple[int, str, int]:
    """Size, sha256 and line count (as ``iter_raw_lines`` counts) of ``path``."""
    digest, size, newlines, last = hashlib.sha256(), 0, 0, b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
            newlines += block.count(b"\n")
            last = block[-1:]
    return size, digest.hexdigest(), newlines + (last != b"\n")


def _open_job(input_path: Path, job_dir: Path, namespace: str, reply_to: str) -> JobState:
    size, sha256, lines = _fingerprint(input_path)
    if not JobState.exists(job_dir):
        return JobState.create(
            job_dir,
            input_path=input_path.resolve(),
            input_bytes=size,
            input_sha256=sha256,
            total_lines=lines,
            namespace=namespace,
            reply_to=reply_to,
        )
    state = JobState.open(job_dir)
    info = state.info
    problem = None
    if (info.input_bytes, info.input_sha256) != (size, sha256):
        problem = "the input file is not the one this job was started with"
    elif (info.namespace, info.reply_to) != (namespace, reply_to):
        problem = f"the job was started on namespace {info.namespace}, replies {info.reply_to}"
    elif state.cancelled:
        problem = "the job was cancelled; start a new job (another --out) to run it again"
    if problem is not None:
        state.close()
        raise BatchError(problem)
    return state


def _summary(
    state: JobState, job_dir: Path, run: BatchRun | None, wall_s: float, failures: int
) -> dict[str, Any]:
    counts = state.counts()
    outcomes = {name: counts["outcomes"].get(name, 0) for name in _OUTCOMES}
    outcomes["cancelled"] = counts["in_flight"] + counts["not_sent"]
    finished_here = run.finished_here if run is not None else 0
    return {
        "job_id": state.info.job_id,
        "status": "cancelled" if outcomes["cancelled"] else "completed",
        "lines": counts["lines"],
        "outcomes": outcomes,
        "errors": counts["errors"],
        "verified": counts["verified"],
        "not_verified": counts["not_verified"],
        "tokens": counts["tokens"],
        "run": {
            "finished": finished_here,
            "recovered": run.recovered if run is not None else 0,
            "resent": run.resent if run is not None else 0,
            "wall_s": round(wall_s, 3),
            "lines_per_s": round(finished_here / wall_s, 1) if wall_s > 0 else 0.0,
        },
        "output": str(job_dir / OUTPUT_FILE),
        "failures": {"path": str(job_dir / FAILURES_FILE), "lines": failures},
    }


async def run_job(
    input_path: Path,
    job_dir: Path,
    kafka: Kafka,
    topics: Topics,
    *,
    reply_to: str | None = None,
    options: BatchOptions | None = None,
    progress: TextIO | None = None,
    client_factory: ClientFactory | None = None,
) -> dict[str, Any]:
    """Start or resume the job in ``job_dir`` over ``input_path``; return its summary once
    every line is finished (``status: completed``) or the job was cancelled. Progress goes to
    ``progress`` (a bar when it is a terminal). ``client_factory(kafka, topics, reply_to)``
    builds the (unstarted) client, to configure it beyond those three. Raises ``BatchError``
    when the job cannot run."""
    options = options or BatchOptions()
    started = time.monotonic()
    reply_to = reply_to or topics.replies
    with _job_lock(job_dir), _open_job(input_path, job_dir, topics.namespace, reply_to) as state:
        total = state.info.total_lines
        done = len(state.finished_line_numbers())
        tty = progress is not None and _isatty(progress)
        bar = Progress(total, done, progress, tty=tty)
        run = None
        if done < total:
            client = (client_factory or InferenceClient)(kafka, topics, reply_to)
            run = BatchRun(state, input_path, kafka, client, options, bar)
            try:
                await run.run()
            finally:
                await client.close()
        bar.finish()
        written = write_outputs(
            state, input_path, job_dir, include_requests=options.include_requests
        )
        return _summary(state, job_dir, run, time.monotonic() - started, written.failures)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def submit_batch(
    input_path: Path,
    job_dir: Path,
    settings: ClientSettings | None = None,
    options: BatchOptions | None = None,
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """``run_job`` on the cluster and namespace of ``settings`` (``OG_CLIENT_*``)."""
    settings = settings or ClientSettings()
    if not input_path.is_file():
        raise BatchError(f"no input file at {input_path}")
    return asyncio.run(
        run_job(
            input_path,
            job_dir,
            ClusterKafka(settings.kafka),
            Topics(settings.namespace),
            reply_to=settings.reply_to,
            options=options,
            progress=progress,
            client_factory=lambda kafka, topics, reply_to: InferenceClient(
                kafka,
                topics,
                reply_to,
                admission=settings.admission,
                attestation=settings.attestation,
            ),
        )
    )


def batch_status(job_dir: Path) -> dict[str, Any]:
    """Counts from the job's state, whether a run holds it, and whether it was cancelled."""
    if not JobState.exists(job_dir):
        raise BatchError(f"no batch job in {job_dir}")
    with JobState.open(job_dir) as state:
        info = state.info
        return {
            "job_id": info.job_id,
            "input": info.input_path,
            "namespace": info.namespace,
            "reply_to": info.reply_to,
            "running": _running(job_dir),
            "cancelled": state.cancelled,
            "output": str(job_dir / OUTPUT_FILE) if (job_dir / OUTPUT_FILE).exists() else None,
            **state.counts(),
        }


def cancel_batch(job_dir: Path) -> dict[str, Any]:
    """Mark the job cancelled. A run holding it stops sending at its next check and writes the
    outputs itself; with no run, the outputs are written here (unfinished lines as
    ``cancelled``). A job whose every line is finished is left as it is."""
    if not JobState.exists(job_dir):
        raise BatchError(f"no batch job in {job_dir}")
    with JobState.open(job_dir) as state:
        counts = state.counts()
        if counts["finished"] == counts["lines"]:
            return {"cancelled": False, "reason": "every line is finished already"}
        state.mark_cancelled()
        try:
            with _job_lock(job_dir):
                input_path = Path(state.info.input_path)
                if not input_path.is_file():
                    return {"cancelled": True, "running": False, "output": None}
                written = write_outputs(state, input_path, job_dir)
                return {
                    "cancelled": True,
                    "running": False,
                    "output": str(job_dir / OUTPUT_FILE),
                    "cancelled_lines": written.cancelled,
                }
        except BatchError:
            return {"cancelled": True, "running": True}
