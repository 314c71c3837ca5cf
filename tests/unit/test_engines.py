"""The ONNX and HF causal-LM engines on the demo models, loaded through ``worker.engines``.
The vLLM engine's request translation is tested in test_engines_vllm.py."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from schemas.requests import ChatInput, MLInput, SamplingParams
from schemas.results import ChatOutput, ErrorCode, MLOutput
from worker.engines import Engine, load_engine
from worker.engines.hf import HFCausalLMEngine
from worker.engines.onnx import OnnxEngine
from worker.errors import PermanentError
from worker.modelstore.local_hub import LocalHub

ML_EXAMPLE = MLInput.model_validate(
    {
        "kind": "ml",
        "tensors": {"x": {"dtype": "float32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}},
    }
)


async def _engine(demo_hub: Path, cache: Path, name: str) -> Engine:
    hub = LocalHub(demo_hub)
    ref = hub.resolve(name)
    return await load_engine(ref, hub.materialize(ref, cache))


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def _chat(content: str = "Hello, node!", **params: Any) -> ChatInput:
    return ChatInput(
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        params=SamplingParams(**params),
    )


# --- ONNX ---------------------------------------------------------------------------------


async def test_onnx_example_input_gives_probabilities(demo_hub: Path, model_cache: Path) -> None:
    engine = await _engine(demo_hub, model_cache, "demo-mlp")
    assert isinstance(engine, OnnxEngine)
    assert engine.model_digest == LocalHub(demo_hub).resolve("demo-mlp").digest
    example = MLInput.model_validate(LocalHub(demo_hub).resolve("demo-mlp").example_input)
    result = await engine.run(example)
    assert isinstance(result.output, MLOutput)
    probs = result.output.tensors["probabilities"]
    assert probs.dtype == "float32"
    assert probs.shape == [1, 3]
    assert math.isclose(sum(probs.data), 1.0, abs_tol=1e-5)  # type: ignore[arg-type]
    assert result.usage.input_tokens == result.usage.output_tokens == 0
    await engine.close()


async def test_onnx_batch_of_five(demo_hub: Path, model_cache: Path) -> None:
    engine = await _engine(demo_hub, model_cache, "demo-mlp")
    data = [float(i) / 7 - 1 for i in range(20)]
    payload = MLInput.model_validate(
        {"tensors": {"x": {"dtype": "float32", "shape": [5, 4], "data": data}}}
    )
    result = await engine.run(payload)
    assert isinstance(result.output, MLOutput)
    probs = result.output.tensors["probabilities"]
    assert probs.shape == [5, 3]
    for row in range(5):
        assert math.isclose(sum(probs.data[row * 3 : row * 3 + 3]), 1.0, abs_tol=1e-5)  # type: ignore[arg-type]


# Values chosen to be recognisable in a message if an engine ever echoed them.
_SECRET_VALUES = [123.456, -987.654, 31337.5, 4242.25]


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"y": {"dtype": "float32", "shape": [1, 4], "data": _SECRET_VALUES}}, "x"),
        (
            {
                "x": {"dtype": "float32", "shape": [1, 4], "data": _SECRET_VALUES},
                "extra": {"dtype": "float32", "shape": [1], "data": [5555.5]},
            },
            "does not take",
        ),
        (
            {"x": {"dtype": "int64", "shape": [1, 4], "data": [1234, 5678, 9012, 3456]}},
            "expected dtype float32",
        ),
        ({"x": {"dtype": "float32", "shape": [4], "data": _SECRET_VALUES}}, "rank"),
        ({"x": {"dtype": "float32", "shape": [2, 2], "data": _SECRET_VALUES}}, "shape"),
    ],
    ids=["wrong-name", "unexpected-name", "wrong-dtype", "wrong-rank", "wrong-fixed-dim"],
)
async def test_onnx_rejects_malformed_input(
    demo_hub: Path, model_cache: Path, tensors: dict[str, Any], expected: str
) -> None:
    engine = await _engine(demo_hub, model_cache, "demo-mlp")
    with pytest.raises(PermanentError) as info:
        await engine.run(MLInput.model_validate({"tensors": tensors}))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert expected in info.value.message
    for value in [*_SECRET_VALUES, 5555.5, 1234, 5678, "extra", "int64", "[2, 2]"]:
        assert str(value) not in info.value.message  # nothing the request sent


async def test_onnx_rejects_chat(demo_hub: Path, model_cache: Path) -> None:
    engine = await _engine(demo_hub, model_cache, "demo-mlp")
    with pytest.raises(PermanentError) as info:
        await engine.run(_chat("my secret prompt"))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "ml tensors" in info.value.message
    assert "secret" not in info.value.message


# --- HF causal LM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(demo_hub: Path, model_cache: Path) -> Engine:
    # Loaded once per module (importing transformers takes seconds). The engine holds no
    # event-loop state, so a private loop for loading is fine.
    return asyncio.run(_engine(demo_hub, model_cache, "demo-lm"))


async def _text(engine: Engine, payload: ChatInput) -> ChatOutput:
    result = await engine.run(payload)
    assert isinstance(result.output, ChatOutput)
    return result.output


async def test_lm_is_deterministic_for_a_seed(lm: Engine) -> None:
    assert isinstance(lm, HFCausalLMEngine)
    for temperature in (0.0, 1.0):
        payload = _chat(max_tokens=12, seed=11, temperature=temperature)
        assert await _text(lm, payload) == await _text(lm, payload)


async def test_lm_seeds_change_sampled_text(lm: Engine) -> None:
    texts = {
        (await _text(lm, _chat(max_tokens=12, seed=seed, temperature=1.0))).text
        for seed in range(5)
    }
    assert len(texts) > 1


async def test_lm_max_tokens_gives_length(lm: Engine) -> None:
    result = await lm.run(_chat(max_tokens=3, stop=["this cannot appear in 3 tokens"]))
    assert isinstance(result.output, ChatOutput)
    assert result.output.finish_reason == "length"
    assert result.usage.output_tokens == 3
    assert result.usage.input_tokens > 0


async def test_lm_stop_sequence_cuts_text(lm: Engine) -> None:
    greedy = (await _text(lm, _chat(max_tokens=40))).text
    # A stop string that first occurs after the start, so the cut leaves some text.
    cut = next((i for i, ch in enumerate(greedy) if greedy.find(ch) == i and i > 0), None)
    assert cut is not None, "greedy output is one repeated character: pick another prompt"
    stop = greedy[cut : cut + 2]
    output = await _text(lm, _chat(max_tokens=40, stop=[stop, "never-appears"]))
    assert output.finish_reason == "stop"
    assert output.text == greedy[:cut]
    assert stop not in output.text


async def test_lm_rejects_ml_payload(lm: Engine) -> None:
    with pytest.raises(PermanentError) as info:
        await lm.run(ML_EXAMPLE)
    assert info.value.code is ErrorCode.BAD_REQUEST


async def test_lm_rejects_prompt_longer_than_context(lm: Engine) -> None:
    with pytest.raises(PermanentError) as info:
        await lm.run(_chat("z" * 600, max_tokens=4))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "context" in info.value.message
    assert "zzz" not in info.value.message


async def test_lm_caps_generation_at_context(lm: Engine) -> None:
    result = await lm.run(_chat("z" * 480, max_tokens=100))
    assert isinstance(result.output, ChatOutput)
    assert result.usage.input_tokens + result.usage.output_tokens <= 512


async def test_lm_concurrent_runs_stay_deterministic(lm: Engine) -> None:
    payload = _chat(max_tokens=10, seed=3, temperature=1.0)
    alone = await _text(lm, payload)
    together = await asyncio.gather(*(_text(lm, payload) for _ in range(4)))
    assert all(output == alone for output in together)
