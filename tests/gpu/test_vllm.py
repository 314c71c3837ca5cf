"""The vLLM engine on a real GPU: the demo GPT-2 served as a ``vllm`` model.

Runs only where CUDA is available (``tests/conftest.py`` skips ``gpu`` tests elsewhere) and
needs the ``gpu`` extra. One engine for the module, on one event loop (vLLM's output handler
lives on the loop that sent the first request).
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from schemas.requests import ChatInput
from schemas.results import ChatOutput
from worker.engines import load_engine
from worker.engines.base import Delta, Engine, RunContext
from worker.models.cache import ModelCache
from worker.models.demo import add_model
from worker.models.local_hub import LocalHub
from worker.models.refs import ModelFormat

pytestmark = [pytest.mark.gpu, pytest.mark.asyncio(loop_scope="module")]

_ENGINE_ARGS = {"gpu_memory_utilization": 0.3, "enforce_eager": True, "max_model_len": 512}


def _with_engine_args(tar_bytes: bytes) -> bytes:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tar_bytes)) as src,
        tarfile.open(fileobj=out, mode="w") as dst,
    ):
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        data = json.dumps(_ENGINE_ARGS).encode()
        info = tarfile.TarInfo("vllm.json")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(demo_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    root = tmp_path_factory.mktemp("vllm-hub")
    lm = LocalHub(demo_hub).resolve("demo-lm")
    tar = _with_engine_args((demo_hub / lm.uri).read_bytes())
    ref = add_model(root, "demo-lm-vllm", ModelFormat.VLLM, tar, lm.example_input)
    cached = ModelCache(tmp_path_factory.mktemp("vllm-cache"), LocalHub(root)).materialize(ref)
    loaded = await load_engine(ref, cached.path, on_close=cached.release)
    yield loaded
    await loaded.close()
    assert not cached.in_use


def _chat(**params: object) -> ChatInput:
    return ChatInput.model_validate(
        {"messages": [{"role": "user", "content": "Hello, node!"}], "params": params}
    )


async def _text(engine: Engine, payload: ChatInput, ctx: RunContext | None = None) -> ChatOutput:
    result = await engine.run(payload, ctx)
    assert isinstance(result.output, ChatOutput)
    return result.output


async def test_seeded_generation_is_reproducible(engine: Engine) -> None:
    payload = _chat(max_tokens=16, seed=4, temperature=1.0)
    assert await _text(engine, payload) == await _text(engine, payload)
    out = await engine.run(_chat(max_tokens=5, stop=["no such stop"]))
    assert isinstance(out.output, ChatOutput) and out.output.finish_reason == "length"
    assert out.usage.output_tokens == 5 and out.usage.input_tokens > 0


async def test_stream_reassembles_with_a_stop_sequence(engine: Engine) -> None:
    greedy = (await _text(engine, _chat(max_tokens=40))).text
    stop = greedy[5:7]
    deltas: list[str] = []

    async def emit(delta: Delta) -> None:
        deltas.append(delta.text)

    out = await _text(engine, _chat(max_tokens=40, stop=[stop]), RunContext(emit=emit))
    assert out.finish_reason == "stop" and stop not in out.text
    assert "".join(deltas) == out.text


async def test_concurrent_requests_are_batched_and_exact(engine: Engine) -> None:
    payloads = [_chat(max_tokens=24, seed=i, temperature=0.8) for i in range(16)]
    alone = [await _text(engine, p) for p in payloads[:2]]
    together = await asyncio.gather(*(_text(engine, p) for p in payloads))
    assert together[:2] == alone
    assert len({o.text for o in together}) > 1


async def test_cancelled_request_is_aborted(engine: Engine) -> None:
    started = asyncio.Event()

    async def emit(delta: Delta) -> None:
        started.set()

    task = asyncio.create_task(
        engine.run(_chat(max_tokens=400, temperature=1.0), RunContext(emit=emit))
    )
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await _text(engine, _chat(max_tokens=3))).text is not None
