"""The CPU causal-LM engine on the demo model: determinism, finish reasons, streaming that
reassembles exactly (stop sequences, characters split across tokens), cancellation, and
requests it must refuse. Plus the text-streaming helpers on their own."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from schemas.requests import ChatInput, InferenceRequest
from schemas.results import ChatOutput, ErrorCode, InferenceResult, StreamChunk
from schemas.signing import Signer
from tests.harness.pipeline import CHAIN_SIGNER
from worker.engines import load_engine
from worker.engines.base import Delta, Engine, RunContext
from worker.engines.hf import (
    HFCausalLMEngine,
    IncrementalDecoder,
    StreamDivergedError,
    TextStream,
)
from worker.errors import PermanentError
from worker.modelstore.local_hub import LocalHub
from worker.pipeline import Pipeline

NOW_MS = 1_795_000_000_000


@pytest.fixture(scope="module")
def lm(demo_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    hub = LocalHub(demo_hub)
    ref = hub.resolve("demo-lm")
    path = hub.materialize(ref, tmp_path_factory.mktemp("lm-cache"))
    engine = asyncio.run(load_engine(ref, path))
    assert isinstance(engine, HFCausalLMEngine)
    return engine


def _chat(content: str = "Hello, node!", **params: Any) -> ChatInput:
    return ChatInput.model_validate(
        {"messages": [{"role": "user", "content": content}], "params": params}
    )


class Recorder:
    """An ``emit`` that records deltas and the thread each arrived on."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.threads: set[int] = set()

    async def __call__(self, delta: Delta) -> None:
        self.threads.add(threading.get_ident())
        self.deltas.append(delta.text)


async def _streamed(engine: Engine, payload: ChatInput) -> tuple[ChatOutput, Recorder]:
    recorder = Recorder()
    result = await engine.run(payload, RunContext(request_id="r", emit=recorder))
    assert isinstance(result.output, ChatOutput)
    return result.output, recorder


async def _plain(engine: Engine, payload: ChatInput) -> ChatOutput:
    result = await engine.run(payload)
    assert isinstance(result.output, ChatOutput)
    return result.output


async def test_same_seed_same_output_streamed_or_not(lm: Engine) -> None:
    payload = _chat(max_tokens=24, seed=5, temperature=1.0)
    plain = await _plain(lm, payload)
    assert plain == await _plain(lm, payload)
    streamed, recorder = await _streamed(lm, payload)
    assert streamed == plain
    assert "".join(recorder.deltas) == plain.text
    assert recorder.threads == {threading.get_ident()}  # emitted on the event loop, in order


async def test_max_tokens_gives_length(lm: Engine) -> None:
    result = await lm.run(_chat(max_tokens=5, stop=["no such stop sequence here"]))
    assert isinstance(result.output, ChatOutput)
    assert result.output.finish_reason == "length"
    assert result.usage.output_tokens == 5


@pytest.mark.parametrize("seed", range(6))
async def test_sampled_streams_reassemble_exactly(lm: Engine, seed: int) -> None:
    # A random-weight byte-level model emits arbitrary bytes: multi-byte characters split
    # across tokens, and invalid sequences (U+FFFD), are the normal case here.
    payload = _chat(max_tokens=40, seed=seed, temperature=1.5)
    output, recorder = await _streamed(lm, payload)
    assert "".join(recorder.deltas) == output.text
    assert all(recorder.deltas)  # no empty chunks
    assert output == await _plain(lm, payload)


async def test_stream_with_stop_sequence_never_sends_the_stop(lm: Engine) -> None:
    greedy = await _plain(lm, _chat(max_tokens=60))
    cut = next((i for i, ch in enumerate(greedy.text) if greedy.text.find(ch) == i and i > 3))
    stop = greedy.text[cut : cut + 3]
    output, recorder = await _streamed(lm, _chat(max_tokens=60, stop=[stop]))
    assert output.finish_reason == "stop"
    assert output.text == greedy.text[:cut]
    assert "".join(recorder.deltas) == output.text
    sent = ""
    for delta in recorder.deltas:
        sent += delta
        assert stop not in sent and output.text.startswith(sent)


async def test_streamed_request_through_the_pipeline(lm: Engine) -> None:
    chunks: list[StreamChunk] = []

    async def sink(chunk: StreamChunk) -> None:
        chunks.append(chunk)

    pipeline = Pipeline(
        {"demo-lm": lm}, Signer(b"\x02" * 32), CHAIN_SIGNER, clock_ms=lambda: NOW_MS
    )
    request = InferenceRequest(
        request_id="stream-1",
        model="demo-lm",
        created_unix_ms=NOW_MS,
        stream=True,
        payload=_chat(max_tokens=30, seed=1, temperature=1.0, stop=["zz"]),
    )
    outcome = await pipeline.handle(request, chunks=sink)
    assert isinstance(outcome.reply, InferenceResult)
    assert isinstance(outcome.reply.output, ChatOutput)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert "".join(c.text for c in chunks) == outcome.reply.output.text


async def test_cancelled_generation_stops_and_frees_the_engine(lm: Engine) -> None:
    started = asyncio.Event()

    async def emit(delta: Delta) -> None:
        started.set()

    long = _chat(max_tokens=450, temperature=1.0, seed=3)
    task = asyncio.create_task(lm.run(long, RunContext(emit=emit)))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    began = time.perf_counter()
    await _plain(lm, _chat(max_tokens=2))  # the lock is free again at once
    assert time.perf_counter() - began < 5


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool calling"),
        ({"response_format": {"type": "json_object"}}, "response_format json_object"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "object"}},
                }
            },
            "response_format json_schema",
        ),
    ],
)
async def test_unsupported_features_are_invalid_requests(
    lm: Engine, extra: dict[str, Any], what: str
) -> None:
    payload = ChatInput.model_validate(
        {"messages": [{"role": "user", "content": "secret prompt"}], **extra}
    )
    with pytest.raises(PermanentError) as info:
        await lm.run(payload)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert what in info.value.message and "secret" not in info.value.message


async def test_a_prompt_beyond_the_context_is_refused_without_its_length(lm: Engine) -> None:
    """The refusal names the model's context, never how long the prompt was (a size taken
    from the request: for a sealed request, more than its ciphertext length says)."""
    assert isinstance(lm, HFCausalLMEngine) and lm._max_positions is not None
    length = lm._max_positions + 77
    payload = ChatInput.model_validate({"messages": [{"role": "user", "content": "x" * length}]})
    with pytest.raises(PermanentError) as info:
        await lm.run(payload)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert f"context of {lm._max_positions} tokens" in info.value.message
    assert not any(str(n) in info.value.message for n in range(length - 10, length + 200))


async def test_tools_with_choice_none_and_text_format_are_fine(lm: Engine) -> None:
    payload = ChatInput.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "params": {"max_tokens": 3},
        }
    )
    assert (await _plain(lm, payload)).text is not None


# --- helpers ------------------------------------------------------------------------------


def test_text_stream_holds_back_a_possible_stop_sequence() -> None:
    stream = TextStream(["END"])
    assert stream.update("Hello E") == "Hello "
    assert stream.update("Hello EN") == ""
    assert stream.update("Hello ENx") == "ENx"  # it was not the stop after all
    assert stream.update("Hello ENxEND and more") == ""  # nothing at or past the stop
    assert stream.finish("Hello ENx") == ""
    assert stream.sent == "Hello ENx"


def test_text_stream_holds_back_an_incomplete_character() -> None:
    stream = TextStream([])
    assert stream.update("ab\ufffd") == "ab"
    assert stream.update("abé") == "é"
    assert stream.finish("abé\ufffd") == "\ufffd"  # a real replacement char is sent at the end


def test_text_stream_refuses_a_final_text_that_contradicts_the_chunks() -> None:
    stream = TextStream([])
    stream.update("abc")
    with pytest.raises(StreamDivergedError):
        stream.finish("abd")


def test_incremental_decoder_joins_split_utf8() -> None:
    decoder = IncrementalDecoder(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    text = "naïve ✓"
    pieces = [decoder.push([b]) for b in text.encode()]
    assert pieces[-1] == text
    assert all("\ufffd" not in p for p in pieces)
    assert all(text.startswith(p) for p in pieces)
