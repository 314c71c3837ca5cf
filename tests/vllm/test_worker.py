"""The vLLM engine behind the worker, on the real broker: requests go in through Kafka and come
back as signed results (or typed errors) a client verifies.

One worker (one engine) serves the module's topics; each test has a client of its own, which
reads the replies topic from its end and takes only the answers to its own requests. The
worker's engine reports its batch to the worker's metrics (``og_worker_engine_batch_requests``),
which the batching test reads. Cancellation on shutdown needs a worker to stop: it gets one of
its own.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from client import InferenceClient, build_request, check_stream, verify_result
from infra.dev.broker import BrokerProcess
from infra.kafka.admin import ensure_topics
from schemas.requests import ChatInput, InferenceRequest
from schemas.results import ChatOutput, ErrorCode, ErrorReply, InferenceResult, StreamChunk
from schemas.topics import Topics, standard_topics
from tests.vllm.conftest import MODEL, OPEN_ADMISSION, kafka_settings
from worker.app import Worker
from worker.engines.vllm import VLLMEngine
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.kafka, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Served:
    worker: Worker
    engine: VLLMEngine
    namespace: str
    bootstrap: str


async def start_worker(
    bootstrap: str, hub: Path, work: Path, **settings: object
) -> tuple[Worker, asyncio.Task[None], str]:
    namespace = "v" + uuid.uuid4().hex[:12]
    await ensure_topics(bootstrap, standard_topics(namespace, [MODEL]))
    worker = Worker(
        WorkerSettings(
            namespace=namespace,
            kafka=kafka_settings(bootstrap),
            group_id=f"{namespace}-workers",
            models=[MODEL],
            hub_dir=hub,
            cache_dir=work / "cache",
            key_dir=work / "keys",
            admission=OPEN_ADMISSION,
            **settings,  # type: ignore[arg-type]
        )
    )
    await worker.setup()
    engine = worker.engines[MODEL]
    assert isinstance(engine, VLLMEngine)
    # The composition root's wiring, spelled out: the engine's steps feed the worker's metric.
    engine.observe_batches(functools.partial(worker.metrics.engine_step, MODEL))
    return worker, asyncio.create_task(worker.run()), namespace


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    broker: BrokerProcess, vllm_hub: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    work = tmp_path_factory.mktemp("vllm-worker")
    worker, task, namespace = await start_worker(broker.bootstrap, vllm_hub, work)
    engine = worker.engines[MODEL]
    assert isinstance(engine, VLLMEngine)
    yield Served(worker, engine, namespace, broker.bootstrap)
    worker.stop()
    async with asyncio.timeout(60):
        await task
    await worker.close()


@pytest_asyncio.fixture(loop_scope="module")
async def client(served: Served) -> AsyncIterator[InferenceClient]:
    """A client of its own per test: it reads the replies topic from its end and takes only
    replies to its own requests (verified: signed by the admitted worker)."""
    async with InferenceClient(
        kafka_settings(served.bootstrap), Topics(served.namespace), admission=OPEN_ADMISSION
    ) as c:
        yield c


def request(
    content: str = "Hello, node!",
    *,
    stream: bool = False,
    deadline_s: float | None = None,
    **params: object,
) -> InferenceRequest:
    payload = ChatInput.model_validate(
        {"messages": [{"role": "user", "content": content}], "params": params}
    )
    return build_request(MODEL, payload, deadline_s=deadline_s).model_copy(
        update={"stream": stream}
    )


async def answer(
    client: InferenceClient, req: InferenceRequest, timeout_s: float = 60.0
) -> tuple[InferenceResult | ErrorReply, list[StreamChunk]]:
    chunks: list[StreamChunk] = []
    reply = await client.request(req, timeout_s, on_chunk=chunks.append)
    assert not isinstance(reply, ErrorReply) or reply.code is not ErrorCode.INTERNAL, reply
    assert isinstance(reply, InferenceResult | ErrorReply)
    return reply, chunks


def result(
    reply: InferenceResult | ErrorReply,
    req: InferenceRequest,
    served: Served,
    client: InferenceClient,
) -> ChatOutput:
    """The output of a result that verifies offline too, signed by the worker under test."""
    assert isinstance(reply, InferenceResult), reply
    report = verify_result(reply, req, trust=client.trust.snapshot())
    assert report.ok, report.as_dict()
    assert reply.envelope.node_id == served.worker.signer.node_id
    assert isinstance(reply.output, ChatOutput)
    return reply.output


async def test_chat_request_is_answered_with_a_verifiable_result(
    served: Served, client: InferenceClient
) -> None:
    req = request(max_tokens=12, seed=3, temperature=0.9)
    reply, _ = await answer(client, req)
    output = result(reply, req, served, client)
    assert output.finish_reason in {"stop", "length"} and output.text
    assert isinstance(reply, InferenceResult)
    assert (
        reply.envelope.model_id == MODEL
        and reply.envelope.model_digest == served.engine.model_digest
    )
    assert 0 < reply.envelope.usage.output_tokens <= 12 and reply.envelope.usage.input_tokens > 0


async def test_stream_with_a_stop_sequence_truncates_mid_text(
    served: Served, client: InferenceClient
) -> None:
    plain = request(max_tokens=48, seed=11, temperature=1.0)
    full = result((await answer(client, plain))[0], plain, served, client).text
    stop, cut = next(
        (full[i : i + 2], i)
        for i in range(4, len(full) - 4)
        if full[i : i + 2].isprintable() and full.find(full[i : i + 2]) == i
    )
    streamed = request(max_tokens=48, seed=11, temperature=1.0, stop=[stop], stream=True)
    reply, chunks = await answer(client, streamed)
    output = result(reply, streamed, served, client)
    assert output.finish_reason == "stop"
    assert output.text == full[:cut] and 0 < len(output.text) < len(full)
    assert chunks and check_stream(chunks, output)


async def test_seeded_requests_are_deterministic(served: Served, client: InferenceClient) -> None:
    same = [request(max_tokens=24, seed=42, temperature=1.0) for _ in range(2)]
    other = request(max_tokens=24, seed=43, temperature=1.0)
    replies = [(await answer(client, r))[0] for r in [*same, other]]
    outputs = [
        result(reply, r, served, client) for reply, r in zip(replies, [*same, other], strict=True)
    ]
    assert outputs[0] == outputs[1] != outputs[2]
    hashes = [r.envelope.output_hash for r in replies if isinstance(r, InferenceResult)]
    assert hashes[0] == hashes[1] != hashes[2]


async def test_deadline_aborts_generation_in_the_engine(
    served: Served, client: InferenceClient
) -> None:
    req = request(max_tokens=4000, stream=True, deadline_s=2.0)  # greedy: ~4,000 tokens to go
    started = time.monotonic()
    reply, chunks = await answer(client, req)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.DEADLINE_EXCEEDED, reply
    # The engine and the pipeline both bound execution by the deadline; either may answer.
    assert "deadline passed during" in reply.message
    assert not reply.retryable
    assert chunks  # it was generating when the deadline passed, and was cut there
    assert time.monotonic() - started < 10.0
    async with asyncio.timeout(10):
        while served.engine.unfinished_requests():
            await asyncio.sleep(0.02)


async def test_invalid_requests_are_answered_invalid_request(
    served: Served, client: InferenceClient
) -> None:
    tools = request().model_copy(
        update={
            "payload": ChatInput.model_validate(
                {
                    "messages": [{"role": "user", "content": "What is the weather?"}],
                    "tools": [{"type": "function", "function": {"name": "weather"}}],
                }
            )
        }
    )
    reply, _ = await answer(client, tools)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.INVALID_REQUEST, reply
    assert not reply.retryable

    secret = "zebra-" * 900  # over the model's context; never echoed back, not even its size
    reply, _ = await answer(client, request(secret))
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_REQUEST, reply
    assert reply.message == f"model {MODEL}: the prompt does not fit the model's context"


async def test_concurrent_requests_are_batched_by_the_engine(
    served: Served, client: InferenceClient
) -> None:
    registry = served.worker.metrics.registry

    def steps(le: str) -> float:
        name = "og_worker_engine_batch_requests_bucket"
        return registry.get_sample_value(name, {"model": MODEL, "le": le}) or 0.0

    before_all, before_small = steps("+Inf"), steps("16.0")
    reqs = [
        request(f"Question {i}: " + "tell me more " * 11, max_tokens=32, seed=i, temperature=0.8)
        for i in range(32)
    ]
    replies = await asyncio.gather(*(answer(client, r) for r in reqs))
    outputs = [
        result(reply, r, served, client) for (reply, _), r in zip(replies, reqs, strict=True)
    ]
    assert len({o.text for o in outputs}) > 1
    big_steps = (steps("+Inf") - before_all) - (steps("16.0") - before_small)
    assert big_steps > 0, (
        f"no engine step ran more than 16 requests (max {served.engine.max_batch_requests})"
    )


async def test_shutdown_cancels_and_aborts_generation(
    broker: BrokerProcess, vllm_hub: Path, tmp_path: Path
) -> None:
    """A request still generating when the drain bound runs out is cancelled by the worker and
    aborted in vLLM (its KV blocks freed at once); it is left uncommitted for the next owner."""
    worker, task, namespace = await start_worker(
        broker.bootstrap, vllm_hub, tmp_path, drain_timeout_s=0.5
    )
    engine = worker.engines[MODEL]
    assert isinstance(engine, VLLMEngine)
    try:
        async with InferenceClient(
            kafka_settings(broker.bootstrap), Topics(namespace), admission=OPEN_ADMISSION
        ) as c:
            first_chunk = asyncio.Event()
            await c.send(request(max_tokens=4000, stream=True), lambda _: first_chunk.set())
            async with asyncio.timeout(60):
                await first_chunk.wait()
            assert engine.unfinished_requests() == 1
            worker.stop()
            async with asyncio.timeout(30):
                await task
            assert engine.unfinished_requests() == 0  # aborted in the engine, not left running
            abandoned = worker.metrics.registry.get_sample_value(
                "og_worker_requests_abandoned_total", {"model": MODEL}
            )
            assert abandoned == 1
    finally:
        worker.stop()
        if not task.done():
            task.cancel()
        await worker.close()
