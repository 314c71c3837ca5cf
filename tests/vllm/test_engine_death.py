"""Engine death is fatal: the real ``inference-node worker`` process answers the request in
flight with a typed, retryable ``internal`` error, then exits non-zero for its orchestrator to
restart it (STYLE: "engine death is fatal")."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import psutil
import pytest

from bench.vllm import worker_env, worker_process
from client import InferenceClient, build_request
from infra.dev.broker import BrokerProcess
from infra.kafka.admin import ensure_topics
from schemas.requests import ChatInput
from schemas.results import ErrorCode, ErrorReply, StreamChunk
from schemas.topics import Topics, standard_topics
from tests.vllm.conftest import MODEL, OPEN_ADMISSION, kafka_settings

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

PROMPT = "a prompt that must never reach a log line"


def _engine_core(worker_pid: int) -> psutil.Process:
    children = psutil.Process(worker_pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    assert len(cores) == 1, [p.name() for p in children]
    return cores[0]


async def test_engine_death_answers_internal_then_the_worker_exits_non_zero(
    broker: BrokerProcess, vllm_hub: Path, tmp_path: Path
) -> None:
    namespace = "v" + uuid.uuid4().hex[:12]
    await ensure_topics(broker.bootstrap, standard_topics(namespace, [MODEL]))
    env = worker_env(broker.bootstrap, namespace, vllm_hub, tmp_path)
    with worker_process(env, tmp_path) as proc:
        async with InferenceClient(
            kafka_settings(broker.bootstrap), Topics(namespace), admission=OPEN_ADMISSION
        ) as client:
            payload = ChatInput.model_validate(
                {"messages": [{"role": "user", "content": PROMPT}], "params": {"max_tokens": 4000}}
            )
            request = build_request(MODEL, payload).model_copy(update={"stream": True})
            generating = asyncio.Event()

            def on_chunk(chunk: StreamChunk) -> None:
                generating.set()

            reply_future = await client.send(request, on_chunk)
            async with asyncio.timeout(60):
                await generating.wait()
            _engine_core(proc.pid).send_signal(signal.SIGKILL)
            async with asyncio.timeout(60):
                reply = await reply_future
        assert isinstance(reply, ErrorReply), reply
        assert reply.request_id == request.request_id
        assert (reply.code, reply.retryable) == (ErrorCode.INTERNAL, True)
        assert reply.message == f"model {MODEL}: the vLLM engine died"
        async with asyncio.timeout(90):
            while proc.poll() is None:
                await asyncio.sleep(0.1)
        assert proc.returncode not in (0, None)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "vLLM engine died; stopping the worker" in log
    assert PROMPT not in log
