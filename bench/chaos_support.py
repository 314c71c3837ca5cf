"""Pieces the fault-harness scenarios share: service processes that can be SIGKILLed and
restarted, a supervisor that counts crashes, environments, namespaces and paced producers.

A *crash* is any exit the harness did not cause: a non-zero status other than from its own
SIGKILL (or from an armed ``OG_FAILPOINT``, which is a SIGKILL the harness asked for), or a
non-zero status after the final SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from client import build_request
from infra.dev.processes import log_tail, spawn
from infra.kafka import KafkaSettings
from infra.kafka.admin import ensure_topics
from infra.kafka.ports import TopicPartition
from schemas import InferenceRequest, MLInput, Tensor, Topics, encode
from schemas.topics import standard_topics
from tests.harness.admission import AdmissionFile
from tests.harness.hostile_node import stop_quietly
from tests.harness.kafka_env import TansuEnv
from worker.settings import WorkerSettings

__all__ = [
    "Child",
    "Exit",
    "Progress",
    "Row",
    "ScenarioError",
    "crash_notes",
    "fast_kafka",
    "group_progress",
    "ledger_rows",
    "new_namespace",
    "produce_paced",
    "requests_for",
    "settlement_env",
    "start_all",
    "supervise",
    "worker_env",
]

REPO = Path(__file__).resolve().parents[1]
MODEL = "demo-mlp"


@dataclass
class Row:
    """One line of the chaos table, plus what else the scenario wants to say."""

    scenario: str
    sent: int = 0
    answered: int = 0
    lost: int = 0
    duplicates: int = 0
    dlq: int = 0
    rejected: int = 0
    crashes: int = 0
    crash_loops: int = 0
    """Crashes of a process that had crashed before with no progress since (see
    ``supervise``): a message that stops the service at every redelivery."""
    notes: dict[str, Any] = field(default_factory=dict)


def fast_kafka(bootstrap: str, **overrides: Any) -> KafkaSettings:
    """Short group timeouts: a SIGKILLed member is noticed after 3 s, not 10."""
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        **overrides,
    )


async def new_namespace(bootstrap: str, prefix: str, partitions: int = 4) -> Topics:
    ns = prefix + uuid.uuid4().hex[:8]
    await ensure_topics(bootstrap, standard_topics(ns, [MODEL], request_partitions=partitions))
    return Topics(ns)


def _base_env(prefix: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OG_", prefix))}


def _admission(run: Path) -> AdmissionFile:
    """The run's pinned admission authority (one list beside every node and ledger of it)."""
    run.mkdir(parents=True, exist_ok=True)
    return AdmissionFile(run / "admission.json")


def worker_env(bootstrap: str, topics: Topics, hub: Path, state: Path) -> dict[str, str]:
    """A worker that the run's authority admits (its keys are made now)."""
    admission = _admission(state.parent)
    admission.admit_worker(WorkerSettings(key_dir=state / "keys"))
    return (
        _base_env("OG_WORKER_")
        | admission.env("OG_WORKER_")
        | {
            "OG_WORKER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "OG_WORKER_KAFKA__SESSION_TIMEOUT_MS": "3000",
            "OG_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            "OG_WORKER_NAMESPACE": topics.namespace,
            "OG_WORKER_GROUP_ID": f"{topics.namespace}-workers",
            "OG_WORKER_MODELS": json.dumps([MODEL]),
            "OG_WORKER_HUB_DIR": str(hub),
            "OG_WORKER_CACHE_DIR": str(state / "cache"),
            "OG_WORKER_KEY_DIR": str(state / "keys"),
            "OG_WORKER_DRAIN_TIMEOUT_S": "10",
            "OG_WORKER_LOG_LEVEL": "INFO",
        }
    )


def settlement_env(bootstrap: str, topics: Topics, ledger: Path) -> dict[str, str]:
    return (
        _base_env("OG_SETTLEMENT_")
        | _admission(ledger.parent).env("OG_SETTLEMENT_")
        | {
            "OG_SETTLEMENT_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "OG_SETTLEMENT_KAFKA__SESSION_TIMEOUT_MS": "3000",
            "OG_SETTLEMENT_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            "OG_SETTLEMENT_NAMESPACE": topics.namespace,
            "OG_SETTLEMENT_GROUP_ID": f"{topics.namespace}-settlement",
            "OG_SETTLEMENT_LEDGER_URL": str(ledger),
            "OG_SETTLEMENT_ANCHOR": "false",
            "OG_SETTLEMENT_LOG_LEVEL": "INFO",
        }
    )


@dataclass(frozen=True)
class Exit:
    name: str
    rc: int
    expected: bool
    tail: str = ""
    failpoint: bool = False
    """Killed by its own armed ``OG_FAILPOINT``, not by the harness."""


class Child:
    """``inference-node worker`` or ``inference-node settlement run`` under a stable name.

    Each ``start`` is a new process with the same environment (so the same key dir or
    ledger); it dies with the harness (``infra.dev.processes.spawn``, PDEATHSIG).
    """

    def __init__(
        self,
        role: str,
        name: str,
        env: dict[str, str],
        run_dir: Path,
        command: list[str] | None = None,
    ) -> None:
        """``command`` replaces ``inference-node <role>`` (it must take ``--ready-file``)."""
        self.role, self.name, self.env, self.run_dir = role, name, env, run_dir
        self.command = command
        self.node_id = ""
        """What ``inference-node worker`` writes to its ready file (stable across restarts)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.exits: list[Exit] = []
        self._expect_exit = False
        self._armed = False
        run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def ready_path(self) -> Path:
        return self.run_dir / f"{self.name}.ready"

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.name}.{self.generation}.log"

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        self.generation += 1
        self.ready_path.unlink(missing_ok=True)
        action = ["run"] if self.role == "settlement" else []
        args = self.command or [sys.executable, "-m", "nodecli.main", self.role, *action]
        self._expect_exit = False
        self._armed = bool(extra_env and "OG_FAILPOINT" in extra_env)
        self.proc = spawn(
            [*args, "--ready-file", str(self.ready_path)],
            log_path=self.log_path,
            detach=False,
            env=self.env | (extra_env or {}),
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        if self.proc is not None and self.running():
            self._expect_exit = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.reap()

    def reap(self) -> Exit | None:
        """Record the process's exit once; None while it runs (or was reaped already)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        # A failpoint kills its own process with SIGKILL: asked for, so expected.
        failpoint = not self._expect_exit and self._armed and rc == -signal.SIGKILL
        expected = self._expect_exit or failpoint
        tail = "" if expected else log_tail(self.log_path, 15)
        record = Exit(f"{self.name}#{self.generation}", rc, expected, tail, failpoint)
        self.exits.append(record)
        self.proc = None
        return record

    def assigned(self) -> int:
        """Partitions in the latest assignment this process logged (0 before the first)."""
        if not self.running():
            return 0
        latest = 0
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return 0
        for line in lines:
            if '"partitions assigned"' in line:
                with contextlib.suppress(ValueError):
                    latest = len(json.loads(line).get("partitions", []))
        return latest

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.ready_path.exists():
            if not self.running() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        with contextlib.suppress(OSError):
            self.node_id = self.ready_path.read_text().strip()
        return True

    async def wait_exit(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the process to exit by itself (it is not reaped)."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, timeout_s)

    async def terminate(self, timeout_s: float) -> None:
        """SIGTERM; a non-zero exit (or none within ``timeout_s``) counts as a crash."""
        if self.proc is None or not self.running():
            self.reap()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._expect_exit = self.proc.returncode == 0
        self.reap()

    @property
    def crashes(self) -> list[Exit]:
        return [e for e in self.exits if not e.expected]


class ScenarioError(RuntimeError):
    """The scenario could not run (a service never became ready)."""


async def start_all(children: Sequence[Child]) -> None:
    for child in children:
        child.start()
    ready = await asyncio.gather(*(c.wait_ready() for c in children))
    for child, ok in zip(children, ready, strict=True):
        if not ok:
            raise ScenarioError(f"{child.name} not ready; see {child.log_path}")


def crash_notes(children: Sequence[Child]) -> list[dict[str, Any]]:
    return [
        {"process": e.name, "status": e.rc, "log_tail": e.tail.splitlines()[-5:]}
        for c in children
        for e in c.crashes
    ]


Progress = Callable[[], Awaitable[object]]
"""A snapshot of what a service has done (its group's committed offsets, its ledger's rows)."""


async def supervise(
    children: Sequence[Child],
    max_restarts: int = 10,
    *,
    progress: Progress | None = None,
    loops: list[str] | None = None,
) -> None:
    """Restart any child that exits on its own (an orchestrator would); runs until cancelled.
    After ``max_restarts`` crashes of one child it is left down.

    With ``progress``: a crash of a child whose previous crash left ``progress()`` where it
    still is (nothing was done in between: the restarted process stopped again on the same
    input) is a *crash loop*, and its exit's name is appended to ``loops``."""
    at_last_crash: dict[str, object] = {}
    while True:
        for child in children:
            exit_ = child.reap()
            if exit_ is None or exit_.expected:
                continue
            if progress is not None:
                snapshot = await progress()
                if child.name in at_last_crash and at_last_crash[child.name] == snapshot:
                    if loops is not None:
                        loops.append(exit_.name)
                at_last_crash[child.name] = snapshot
            if len(child.crashes) <= max_restarts:
                child.start()
        await asyncio.sleep(0.1)


def group_progress(bootstrap: str, group: str, topic: str) -> Progress:
    """``progress`` for workers: the offsets ``group`` has committed on ``topic``."""

    async def committed() -> object:
        consumer = TansuEnv(bootstrap).kafka.consumer(group)
        await consumer.start()
        try:
            partitions = sorted(await consumer.partitions_for(topic))
            return [await consumer.committed(TopicPartition(topic, p)) for p in partitions]
        finally:
            await stop_quietly(consumer)

    return committed


def requests_for(topics: Topics, n: int) -> list[InferenceRequest]:
    return [
        build_request(
            MODEL,
            MLInput(
                tensors={
                    "x": Tensor(dtype="float32", shape=[1, 4], data=[i % 13 / 7, 0.5, -1.0, 2.0])
                }
            ),
            reply_to=topics.replies,
        )
        for i in range(n)
    ]


async def produce_paced(
    kafka: KafkaSettings,
    topics: Topics,
    requests: Sequence[InferenceRequest],
    rate_per_s: float,
    batch: int = 10,
) -> None:
    """Produce ``requests`` at about ``rate_per_s``, ``batch`` at a time, each acknowledged."""
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for i in range(0, len(requests), batch):
            acks = [
                await producer.send(topics.infer(MODEL), encode(r), key=r.request_id.encode())
                for r in requests[i : i + batch]
            ]
            await asyncio.gather(*acks)
            await asyncio.sleep(max(0.0, start + (i + batch) / rate_per_s - loop.time()))
    finally:
        await producer.stop()


def ledger_rows(path: Path) -> tuple[dict[tuple[str, str], int], int]:
    """(request id, node id) → rows in the ledger, and the number of rejections."""
    if not path.exists():
        return {}, 0
    uri = f"file:{path}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            rows = db.execute(
                "SELECT request_id, node_id, COUNT(*) FROM records GROUP BY request_id, node_id"
            ).fetchall()
            (rejected,) = db.execute("SELECT COUNT(*) FROM rejections").fetchone()
    except sqlite3.OperationalError:  # not created yet
        return {}, 0
    return {(rid, nid): n for rid, nid, n in rows}, int(rejected)
