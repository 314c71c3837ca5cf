"""Four real worker processes start together on an empty shared cache fed by an HTTP hub.

Each blob must be downloaded exactly once (the hub counts requests), and every worker must
serve: each worker has its own consumer group, so every request is answered by all four, and
each answer is checked with the client's verifier and traced to a distinct node id.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from client import InferenceClient, build_request, verify_result
from infra.dev.broker import BrokerProcess
from infra.dev.processes import log_tail, spawn, terminate
from schemas import ChatInput, ErrorReply, InferenceResult, MLInput, Topics
from schemas.results import ErrorCode
from tests.harness.admission import AdmissionFile, trust_in
from tests.harness.hub_server import HubServer
from tests.harness.support import eventually, fast_kafka, read_topic
from worker.modelstore.local_hub import LocalHub
from worker.settings import WorkerSettings

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
WORKERS = 4


def _worker_env(ns: str, bootstrap: str, hub_url: str, cache: Path, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OG_WORKER_")}
    return env | {
        "PYTHONPATH": str(REPO),
        "OG_WORKER_NAMESPACE": ns,
        "OG_WORKER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "OG_WORKER_KAFKA__SESSION_TIMEOUT_MS": "3000",
        "OG_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "OG_WORKER_GROUP_ID": f"{ns}-{state.name}",  # own group: every worker gets everything
        "OG_WORKER_MODELS": json.dumps(["demo-mlp", "demo-lm"]),
        "OG_WORKER_HUB_DIR": str(state / "no-local-hub"),
        "OG_WORKER_CACHE_DIR": str(cache),
        "OG_WORKER_CACHE__HUB_URL": hub_url,
        "OG_WORKER_KEY_DIR": str(state / "keys"),
        "OG_WORKER_LOG_LEVEL": "WARNING",
    }


async def test_four_workers_download_each_blob_once_and_all_serve(
    broker: BrokerProcess,
    namespace: str,
    demo_hub: Path,
    tmp_path: Path,
    admission: AdmissionFile,
) -> None:
    index = LocalHub(demo_hub).index()
    cache = tmp_path / "shared-cache"
    with HubServer(demo_hub) as hub:
        hub.delay_s = 0.02  # keep each download in flight while the other workers start
        states = [tmp_path / f"w{i}" for i in range(WORKERS)]
        for state in states:  # their keys, made now, admitted before they start
            admission.admit_worker(WorkerSettings(key_dir=state / "keys"))
        procs = [
            spawn(
                [sys.executable, "-m", "nodecli.main", "worker", "--ready-file", str(s / "ready")],
                log_path=s / "worker.log",
                detach=False,
                env={
                    **_worker_env(namespace, broker.bootstrap, hub.url, cache, s),
                    **admission.env("OG_WORKER_"),
                },
            )
            for s in states
        ]
        try:

            def all_ready() -> bool:
                for proc, state in zip(procs, states, strict=True):
                    if proc.poll() is not None:
                        raise AssertionError(log_tail(state / "worker.log"))
                return all((s / "ready").exists() for s in states)

            await eventually(all_ready, timeout_s=180)
            node_ids = {(s / "ready").read_text().strip() for s in states}
            assert len(node_ids) == WORKERS

            for ref in index.models:
                assert hub.gets(ref.uri) == [None], f"{ref.name} fetched more than once"

            await _every_worker_answers(broker, namespace, node_ids, admission)
        finally:
            for proc in procs:
                terminate(proc, timeout_s=20)
    assert all(proc.returncode == 0 for proc in procs)
    for ref in index.models:
        assert len(hub.gets(ref.uri)) == 1


async def _every_worker_answers(
    broker: BrokerProcess, namespace: str, node_ids: set[str], admission: AdmissionFile
) -> None:
    topics = Topics(namespace)
    fixed_point = MLInput.model_validate(
        {
            "tensors": {
                "x": {
                    "dtype": "float32",
                    "shape": [1, 4],
                    "data": [
                        {"value": 5, "decimals": 1},
                        {"value": -1, "decimals": 0},
                        2.0,
                        {"value": 25, "decimals": 2},
                    ],
                }
            }
        }
    )
    chat = ChatInput.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 8, "seed": 1}}
    )
    wrong_shape = MLInput.model_validate(
        {"tensors": {"x": {"dtype": "float32", "shape": [1, 2], "data": [1.0, 2.0]}}}
    )
    requests = {
        r.request_id: r
        for r in (
            build_request("demo-mlp", fixed_point),
            build_request("demo-lm", chat),
            build_request("demo-mlp", wrong_shape),
        )
    }
    client = InferenceClient(fast_kafka(broker.bootstrap), topics, admission=admission.settings())
    async with client:
        futures = [await client.send(r) for r in requests.values()]
        await asyncio.wait_for(asyncio.gather(*futures), 60)

    answers: dict[str, list[InferenceResult | ErrorReply]] = {}

    async def four_answers_each() -> bool:
        answers.clear()
        for message in await read_topic(broker.bootstrap, topics.replies, idle_s=0.5):
            raw = json.loads(message.value)
            if raw.get("request_id") not in requests:
                continue
            reply = (
                InferenceResult.model_validate(raw)
                if raw["type"] == "result"
                else ErrorReply.model_validate(raw)
            )
            answers.setdefault(reply.request_id, []).append(reply)
        return all(len(answers.get(rid, [])) == WORKERS for rid in requests)

    await eventually(four_answers_each, timeout_s=60)
    for rid, replies in answers.items():
        request = requests[rid]
        if request.payload == wrong_shape:
            assert all(isinstance(r, ErrorReply) for r in replies)
            assert {r.code for r in replies if isinstance(r, ErrorReply)} == {ErrorCode.BAD_REQUEST}
            assert {r.node_id for r in replies} == node_ids
            continue
        results = [r for r in replies if isinstance(r, InferenceResult)]
        assert len(results) == WORKERS
        for result in results:
            report = verify_result(result, request, trust=trust_in(admission.nodes.items()))
            assert report.ok, report.as_dict()
        assert {r.envelope.node_id for r in results} == node_ids
        # Same artifact, same input: every node commits to the same output.
        assert len({r.envelope.output_hash for r in results}) == 1
