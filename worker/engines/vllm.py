"""vLLM engine (GPU, the ``gpu`` extra): one in-process ``AsyncLLM`` per model.

The shape follows vLLM's own server: one engine per model in the process, one ``generate()``
call per request with a unique request id, so the worker's intake window (many requests in
flight per partition) becomes vLLM's continuous batch. A request cancelled by the worker
(deadline, shutdown, partition revoked) is aborted in the engine, so its KV blocks are freed
at once.

Engine death is fatal. When vLLM reports its engine core dead (``EngineDeadError``), every
request in flight, and every later one, fails with ``EngineDeadError`` below — a
``RetryableError`` (``internal``, retryable: the client may retry on another node) whose
``fatal`` flag tells the worker to stop and exit non-zero — and the engine calls its
``on_fatal`` hook once; the default sends SIGTERM to this process, so the worker drains what
it can and exits for the orchestrator to restart it. A half-dead GPU is never served from.

The translation from our request to vLLM's ``SamplingParams`` is a pure function
(``sampling_kwargs``) tested without vLLM. The prompt is rendered with the model's own chat
template by its Hugging Face tokenizer and passed as token ids, so prompt accounting is exact.
Streaming reuses the CPU engine's ``TextStream``: deltas never include a possible stop
sequence and concatenate exactly to the final text.

Optional engine arguments travel with the model: a ``vllm.json`` file in the model directory
may set ``max_model_len``, ``dtype``, ``gpu_memory_utilization``, ``max_num_seqs``,
``enforce_eager`` and ``quantization``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from schemas.requests import ChatInput, MLInput, SamplingParams
from schemas.results import ChatOutput, ErrorCode, FinishReason, Usage
from worker.engines.base import Delta, Emit, EngineResult, RunContext
from worker.engines.hf import StreamDivergedError, TextStream, refuse_unsupported_chat
from worker.errors import PermanentError, RetryableError
from worker.models.refs import ModelRef

__all__ = ["EngineDeadError", "VLLMEngine", "finish_reason", "sampling_kwargs"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'verifiable-inference-node[gpu]' (needs CUDA)"
_ENGINE_ARGS_FILE = "vllm.json"
_ALLOWED_ENGINE_ARGS = {
    "max_model_len",
    "dtype",
    "gpu_memory_utilization",
    "max_num_seqs",
    "enforce_eager",
    "quantization",
}
_ids = itertools.count()


class EngineDeadError(RetryableError):
    """The vLLM engine core died: answer ``internal`` (retryable), and stop the worker."""

    fatal: ClassVar[bool] = True
    code = ErrorCode.INTERNAL


def sampling_kwargs(
    params: SamplingParams, *, prompt_tokens: int, max_model_len: int
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` equivalent to ``params``.

    Same conventions as the CPU engine: greedy when ``temperature == 0``; the seed defaults to
    0 so an unseeded sampled request is still reproducible; ``max_tokens`` is capped by the
    room left in the context. Stop strings are cut from the output (not included), special
    tokens skipped. ``PermanentError`` when the prompt alone fills the context.
    """
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise PermanentError(
            f"prompt is {prompt_tokens} tokens, the model's context is {max_model_len}",
            code=ErrorCode.BAD_REQUEST,
        )
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": min(params.max_tokens, room),
        "temperature": params.temperature or 0.0,
        "top_p": 1.0 if params.top_p is None else params.top_p,
        "seed": params.seed if params.seed is not None else 0,
        "stop": list(params.stop),
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }
    if params.top_k is not None:
        kwargs["top_k"] = params.top_k  # absent: vLLM's default, every token considered
    return kwargs


def finish_reason(vllm_reason: str | None) -> FinishReason:
    """vLLM's ``CompletionOutput.finish_reason`` on our wire: ``stop`` (EOS or a stop string)
    and ``length`` map through; anything else (``abort``) is not a finished answer."""
    if vllm_reason == "stop":
        return "stop"
    if vllm_reason == "length":
        return "length"
    raise RetryableError(f"generation ended without an answer ({vllm_reason})")


def _import_vllm() -> tuple[Any, Any, Any, type[BaseException]]:
    try:
        import vllm  # type: ignore[import-not-found,unused-ignore]
        from vllm.engine.arg_utils import (  # type: ignore[import-not-found,unused-ignore]
            AsyncEngineArgs,
        )
        from vllm.v1.engine.async_llm import (  # type: ignore[import-not-found,unused-ignore]
            AsyncLLM,
        )
        from vllm.v1.engine.exceptions import (  # type: ignore[import-not-found,unused-ignore]
            EngineDeadError as VLLMEngineDead,
        )
    except ImportError as e:
        raise ImportError(f"the vllm engine needs vLLM and a GPU: {_INSTALL_HINT}") from e
    return vllm, AsyncEngineArgs, AsyncLLM, VLLMEngineDead


def _request_shutdown(error: BaseException) -> None:
    log.critical(
        "vLLM engine died; stopping the worker", extra={"error_type": type(error).__name__}
    )
    os.kill(os.getpid(), signal.SIGTERM)


class VLLMEngine:
    """One model served by an in-process vLLM ``AsyncLLM``. Build with ``await load(...)``."""

    def __init__(
        self,
        ref: ModelRef,
        llm: Any,
        tokenizer: Any,
        *,
        on_close: Callable[[], None] | None = None,
        on_fatal: Callable[[BaseException], None] = _request_shutdown,
    ) -> None:
        self._ref = ref
        self._llm = llm
        self._tokenizer = tokenizer
        self._vllm, _, _, self._dead_type = _import_vllm()
        self._max_model_len = int(llm.model_config.max_model_len)
        self._on_close = on_close
        self._on_fatal = on_fatal
        self._dead: BaseException | None = None

    @classmethod
    async def load(
        cls, ref: ModelRef, path: Path, *, on_close: Callable[[], None] | None = None
    ) -> VLLMEngine:
        """Start the engine (loads weights onto the GPU, minutes for big models) off the loop.

        ``AsyncLLM`` supports construction outside a running loop (it starts its output
        handler on the first request), so building it in a thread is safe.
        """
        _, engine_args_type, async_llm_type, _ = _import_vllm()
        extra = await asyncio.to_thread(_engine_args, path)
        args = engine_args_type(model=str(path), tokenizer=str(path), seed=0, **extra)
        llm = await asyncio.to_thread(async_llm_type.from_engine_args, args)
        from transformers import AutoTokenizer

        tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, str(path), local_files_only=True
        )
        return cls(ref, llm, tokenizer, on_close=on_close)

    @property
    def model_name(self) -> str:
        return self._ref.name

    @property
    def model_digest(self) -> str:
        return self._ref.digest

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        if not isinstance(payload, ChatInput):
            raise PermanentError(
                f"model {self._ref.name} takes chat messages, not ml tensors",
                code=ErrorCode.BAD_REQUEST,
                model=self._ref.name,
            )
        refuse_unsupported_chat(self._ref.name, payload)
        if self._dead is not None or getattr(self._llm, "errored", False):
            raise self._died(self._dead or RuntimeError("engine errored"))
        prompt = await asyncio.to_thread(self._prompt_ids, payload)
        try:
            kwargs = sampling_kwargs(
                payload.params, prompt_tokens=len(prompt), max_model_len=self._max_model_len
            )
        except PermanentError as e:
            raise PermanentError(
                f"model {self._ref.name}: {e.message}", code=e.code, model=self._ref.name
            ) from e
        request_id = (
            f"{(ctx.request_id if ctx else '') or 'req'}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        )
        emit = ctx.emit if ctx is not None else None
        stream = TextStream(payload.params.stop)
        final: Any = None
        try:
            async for output in self._llm.generate(
                {"prompt_token_ids": prompt}, self._vllm.SamplingParams(**kwargs), request_id
            ):
                final = output
                if emit is not None and (delta := stream.update(output.outputs[0].text)):
                    await emit(Delta(text=delta))
        except asyncio.CancelledError:
            await self._llm.abort(request_id)
            raise
        except self._dead_type as e:
            raise self._died(e) from e
        except (ValueError, TypeError) as e:  # request validation inside vLLM
            raise PermanentError(
                f"model {self._ref.name}: vLLM refused the request ({type(e).__name__})",
                code=ErrorCode.INVALID_REQUEST,
                model=self._ref.name,
            ) from e
        except Exception as e:  # EngineGenerateError and the like: this request failed
            raise RetryableError(
                f"model {self._ref.name}: generation failed ({type(e).__name__})",
                model=self._ref.name,
            ) from e
        return await self._result(final, prompt, stream, emit)

    async def _result(
        self, final: Any, prompt: list[int], stream: TextStream, emit: Emit | None
    ) -> EngineResult:
        if final is None or not final.outputs:
            raise RetryableError(f"model {self._ref.name}: no output", model=self._ref.name)
        completion = final.outputs[0]
        reason = finish_reason(completion.finish_reason)
        text: str = completion.text
        if emit is not None:
            try:
                tail = stream.finish(text)
            except StreamDivergedError as e:
                raise PermanentError(
                    f"model {self._ref.name}: streamed text diverged from the final text",
                    code=ErrorCode.INTERNAL,
                    model=self._ref.name,
                ) from e
            if tail:
                await emit(Delta(text=tail))
        return EngineResult(
            output=ChatOutput(text=text, finish_reason=reason),
            usage=Usage(input_tokens=len(prompt), output_tokens=len(completion.token_ids)),
        )

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def _prompt_ids(self, payload: ChatInput) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in payload.messages]
        try:
            encoded = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except Exception as e:
            raise PermanentError(
                f"model {self._ref.name}: the chat template rejected the conversation "
                f"({type(e).__name__})",
                code=ErrorCode.BAD_REQUEST,
                model=self._ref.name,
            ) from e
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return [int(i) for i in ids]

    def _died(self, error: BaseException) -> EngineDeadError:
        if self._dead is None:
            self._dead = error
            self._on_fatal(error)
        return EngineDeadError(
            f"model {self._ref.name}: the vLLM engine died", model=self._ref.name
        )


def _engine_args(path: Path) -> dict[str, Any]:
    """Whitelisted engine arguments from ``<model>/vllm.json`` (none when absent)."""
    file = path / _ENGINE_ARGS_FILE
    if not file.is_file():
        return {}
    raw = json.loads(file.read_text())
    if not isinstance(raw, dict) or not set(raw) <= _ALLOWED_ENGINE_ARGS:
        raise PermanentError(
            f"{_ENGINE_ARGS_FILE} may only set {', '.join(sorted(_ALLOWED_ENGINE_ARGS))}",
            code=ErrorCode.INTERNAL,
        )
    return raw
