"""The vLLM engine (``worker.engines.vllm``) without vLLM: request translation, finish reasons,
engine death, and the install hint when the extra is missing. The engine itself runs on a GPU
in tests/vllm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from schemas.requests import SamplingParams
from schemas.results import ErrorCode
from worker.engines import load_engine
from worker.errors import PermanentError
from worker.modelstore.local_hub import LocalHub


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def test_vllm_sampling_kwargs_follow_the_cpu_engine_conventions() -> None:
    from worker.engines.vllm import sampling_kwargs

    greedy = sampling_kwargs(SamplingParams(max_tokens=50), prompt_tokens=10, max_model_len=100)
    assert greedy == {
        "n": 1,
        "max_tokens": 50,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,  # unseeded requests are still reproducible
        "stop": [],
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }
    sampled = sampling_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, max_tokens=500, stop=["\n\n"], seed=9),
        prompt_tokens=90,
        max_model_len=100,
    )
    assert sampled["max_tokens"] == 10  # capped by the context left
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.7, 0.9, 40)
    assert (sampled["seed"], sampled["stop"]) == (9, ["\n\n"])


def test_vllm_prompt_filling_the_context_is_a_bad_request() -> None:
    from worker.engines.vllm import sampling_kwargs

    with pytest.raises(PermanentError) as info:
        sampling_kwargs(SamplingParams(), prompt_tokens=100, max_model_len=100)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_vllm_finish_reasons_and_engine_death_are_typed() -> None:
    from worker.engines.vllm import EngineDeadError, finish_reason
    from worker.errors import RetryableError

    assert finish_reason("stop") == "stop"
    assert finish_reason("length") == "length"
    with pytest.raises(RetryableError):
        finish_reason("abort")
    dead = EngineDeadError("model m: the vLLM engine died")
    assert isinstance(dead, RetryableError) and dead.fatal and dead.retryable
    assert dead.code is ErrorCode.INTERNAL


async def test_vllm_format_without_vllm_names_the_extra(
    demo_hub: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.modelstore.refs import ModelFormat

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a CPU-only install
    ref = LocalHub(demo_hub).resolve("demo-lm").model_copy(update={"format": ModelFormat.VLLM})
    with pytest.raises(ImportError, match=r"\[gpu\]"):
        await load_engine(ref, model_cache)
