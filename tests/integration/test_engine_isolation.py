"""Engines never wait for one another: each owns its threads (``worker.engines.threads``).

On the shared default executor, an ML request queued behind a backlog of LLM generations; now
a demo-mlp request sent after sixteen long demo-lm generations is answered before the backlog
drains. Asserted by order of arrival, not by a clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from client import InferenceClient, build_request
from infra.dev.broker import BrokerProcess
from schemas import ChatInput, ChatMessage, InferenceResult, MLInput, SamplingParams, Tensor, Topics
from tests.harness.admission import AdmissionFile
from tests.harness.support import fast_kafka
from worker.app import Worker

pytestmark = pytest.mark.kafka

N_GENERATIONS = 16


async def test_an_ml_request_is_not_queued_behind_llm_generations(
    broker: BrokerProcess, namespace: str, running_worker: Worker, admission: AdmissionFile
) -> None:
    chat = ChatInput(
        messages=[ChatMessage(role="user", content="a long answer, please")],
        params=SamplingParams(max_tokens=200, temperature=0.0),
    )
    ml = MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[1, 2, 3, 4])})
    arrived: dict[str, float] = {}
    async with InferenceClient(
        fast_kafka(broker.bootstrap), Topics(namespace), admission=admission.settings()
    ) as client:
        # Warm both engines so the measurement is not a cold load.
        await client.request(build_request("demo-mlp", ml), timeout_s=30)
        await client.request(build_request("demo-lm", chat.model_copy()), timeout_s=60)

        generations = [build_request("demo-lm", chat) for _ in range(N_GENERATIONS)]
        futures = [await client.send(r) for r in generations]
        ml_request = build_request("demo-mlp", ml)
        ml_future = await client.send(ml_request)

        def stamp(request_id: str) -> None:
            arrived[request_id] = time.monotonic()

        for request, future in [*zip(generations, futures, strict=True), (ml_request, ml_future)]:
            future.add_done_callback(lambda _f, rid=request.request_id: stamp(rid))
        replies = await asyncio.wait_for(asyncio.gather(*futures, ml_future), 180)
    assert all(isinstance(r, InferenceResult) for r in replies)
    last_generation = max(arrived[r.request_id] for r in generations)
    # The ML answer does not wait for the LLM backlog (it would arrive last on one pool).
    assert arrived[ml_request.request_id] < last_generation
    llm_before_ml = sum(arrived[r.request_id] < arrived[ml_request.request_id] for r in generations)
    # Measured: 1 with the engine's own threads; 5 of 12 (10 of 16) on the shared pool.
    assert llm_before_ml <= 4, llm_before_ml
