"""``inference-node worker --processes 2`` on the real broker: two processes, one identity, one
consumer group; every request answered once and verified; SIGTERM drains both; a child that
dies takes the pod down (non-zero) instead of leaving it half its size."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from client import InferenceClient, build_request
from infra.dev.broker import BrokerProcess
from schemas.requests import MLInput, Tensor
from schemas.results import InferenceResult
from schemas.topics import Topics
from schemas.verify.result import verify_result
from tests.harness.admission import AdmissionFile, trust_in
from tests.harness.support import eventually, fast_kafka
from worker.settings import WorkerSettings

pytestmark = pytest.mark.kafka

_WORKER = (sys.executable, "-m", "nodecli.main", "worker")


def _start(env: dict[str, str], ready: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [*_WORKER, "--processes", "2", "--ready-file", str(ready)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _env(worker_settings: WorkerSettings, admission: AdmissionFile) -> dict[str, str]:
    s = worker_settings
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("OG_")},
        **admission.env("OG_WORKER_"),
        "OG_WORKER_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        "OG_WORKER_KAFKA__SESSION_TIMEOUT_MS": "3000",
        "OG_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "OG_WORKER_NAMESPACE": s.namespace,
        "OG_WORKER_GROUP_ID": s.group_id,
        "OG_WORKER_MODELS": json.dumps(["demo-mlp"]),
        "OG_WORKER_HUB_DIR": str(s.hub_dir),
        "OG_WORKER_CACHE_DIR": str(s.cache_dir),
        "OG_WORKER_KEY_DIR": str(s.key_dir),
    }


async def test_two_processes_share_one_identity_and_answer_everything_once(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    pod = _start(_env(worker_settings, admission), ready, tmp_path / "pod.log")
    try:
        await eventually(ready.exists, timeout_s=120)
        node_id = ready.read_text().strip()
        assert {(tmp_path / f"ready.{i}").read_text().strip() for i in (0, 1)} == {node_id}
        requests = [
            build_request(
                "demo-mlp",
                MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[i, 0, 1, 2])}),
            )
            for i in range(40)
        ]
        async with InferenceClient(
            fast_kafka(broker.bootstrap), Topics(namespace), admission=admission.settings()
        ) as client:
            replies = await asyncio.wait_for(
                asyncio.gather(*[await client.send(r) for r in requests]), 90
            )
        trust = trust_in(admission.nodes.items())
        for request, reply in zip(requests, replies, strict=True):
            assert isinstance(reply, InferenceResult) and reply.envelope.node_id == node_id
            assert verify_result(reply, request, trust=trust).ok
        pod.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(pod.wait, 60) == 0
        assert not ready.exists()
    finally:
        if pod.poll() is None:
            os.killpg(pod.pid, signal.SIGKILL)


async def test_a_child_that_dies_takes_the_pod_down(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    pod = _start(_env(worker_settings, admission), ready, tmp_path / "pod.log")
    try:
        await eventually(ready.exists, timeout_s=120)
        children = [
            int(pid)
            for pid in subprocess.run(
                ["pgrep", "-P", str(pod.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
        ]
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        assert await asyncio.to_thread(pod.wait, 60) != 0
        await eventually(lambda: all(not Path(f"/proc/{pid}").exists() for pid in children))
    finally:
        if pod.poll() is None:
            os.killpg(pod.pid, signal.SIGKILL)
