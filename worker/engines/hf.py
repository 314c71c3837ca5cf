"""CPU causal-LM engine on torch + transformers, for small models saved with ``save_pretrained``.

Determinism matters more than throughput here: a verifier must be able to re-run a request and
get the same text. So generation is serialised per engine (one ``generate`` at a time, under a
lock) and the global torch RNG is seeded with ``params.seed`` (0 when absent) right before each
call, inside the lock. Greedy decoding when ``temperature == 0``, sampling otherwise. Streaming
does not change what is generated: a streamed and a plain request give the same text.

Stop sequences are matched on the decoded text: a stopping criterion ends generation as soon as
one appears, and the text is cut before the earliest occurrence. ``usage.output_tokens`` counts
every token the model generated, including the ones that spelled the stop sequence or the
end-of-sequence token (the work done, not the length of the returned text).

Streaming (``ctx.emit`` set): each new token is decoded incrementally inside the generation
thread and the safe part of the text is queued to the event loop, which forwards it to
``emit`` in order (``TextStream``, shared with the vLLM engine). Text that could still turn
into a stop sequence, and a trailing incomplete UTF-8 character, are held back; the rest of
the final text is sent when generation ends, so the deltas concatenate exactly to
``ChatOutput.text``.

Tools and structured output (``tools``, ``response_format`` other than text) cannot be honoured
by plain sampling, so such requests get ``invalid_request`` rather than a silently unstructured
answer. torch and transformers are imported lazily so the worker runs ONNX-only without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from schemas.requests import ChatInput, MLInput, SamplingParams
from schemas.results import ChatOutput, ErrorCode, Usage
from worker.engines.base import Delta, EngineResult, RunContext
from worker.engines.threads import EngineThreads
from worker.errors import PermanentError
from worker.modelstore.refs import ModelRef

__all__ = [
    "HFCausalLMEngine",
    "IncrementalDecoder",
    "StreamDivergedError",
    "TextStream",
    "earliest_stop",
    "refuse_unsupported_chat",
]

_INSTALL_HINT = "pip install 'verifiable-inference-node[cpu]'"
_TORCH_THREADS = 1
# Tokens decoded when checking the tail of the output for a stop string: enough for the longest
# stop sequence (limits.MAX_STOP_CHARS) even if every token decodes to a single character.
_STOP_TAIL_TOKENS = 72

Push = Callable[[str | None], None]
"""Hands a text delta (or the end marker ``None``) from the generation thread to the loop."""


def _import_stack() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(
            f"the hf-causal-lm engine needs torch and transformers: {_INSTALL_HINT}"
        ) from e
    return torch, transformers


class HFCausalLMEngine:
    """A transformers causal LM plus its tokenizer. Build it with ``await load(ref, path)``."""

    def __init__(
        self, ref: ModelRef, path: Path, *, on_close: Callable[[], None] | None = None
    ) -> None:
        """Load model and tokenizer from ``path`` (blocking; ``load`` runs it in a thread)."""
        torch, transformers = _import_stack()
        # One intra-op thread: on a small (2-core) worker a tiny model gains little from more,
        # and the event loop, Kafka client and ONNX sessions stay responsive. Process-wide.
        torch.set_num_threads(_TORCH_THREADS)
        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in logs
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path), local_files_only=True
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise PermanentError(
                f"model {ref.name}: cannot load the causal LM ({type(e).__name__})",
                code=ErrorCode.INTERNAL,
                model=ref.name,
            ) from e
        self._model = model.eval()
        self._torch = torch
        self._transformers = transformers
        self._ref = ref
        self._lock = threading.Lock()
        self._threads = EngineThreads(ref.name, 1)
        self._on_close = on_close
        self._max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._eos_ids = _eos_ids(model, self._tokenizer)
        pad = self._tokenizer.pad_token_id
        self._pad_id: int | None = pad if pad is not None else next(iter(self._eos_ids), None)

    @classmethod
    async def load(
        cls, ref: ModelRef, path: Path, *, on_close: Callable[[], None] | None = None
    ) -> HFCausalLMEngine:
        return await asyncio.to_thread(cls, ref, path, on_close=on_close)

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
        cancel = threading.Event()
        emit = ctx.emit if ctx is not None else None
        if emit is None:
            try:
                return await self._threads.run(self._generate, payload, None, cancel)
            except asyncio.CancelledError:
                cancel.set()  # the thread stops at its next token
                raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def push(delta: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening now
                loop.call_soon_threadsafe(queue.put_nowait, delta)

        generation = asyncio.ensure_future(self._threads.run(self._generate, payload, push, cancel))
        # If this request is abandoned, the thread's outcome is never awaited: mark it seen.
        generation.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            while (delta := await queue.get()) is not None:
                await emit(Delta(text=delta))
            return await generation
        except BaseException:
            cancel.set()
            raise

    async def close(self) -> None:
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
        except Exception as e:  # jinja errors (e.g. a role the template refuses)
            raise PermanentError(
                f"model {self._ref.name}: the chat template rejected the conversation "
                f"({type(e).__name__})",
                code=ErrorCode.BAD_REQUEST,
                model=self._ref.name,
            ) from e
        # transformers 5 returns a BatchEncoding by default; 4.x returned the id list.
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return [int(i) for i in ids]

    def _generate(
        self, payload: ChatInput, push: Push | None, cancel: threading.Event
    ) -> EngineResult:
        """Runs in a worker thread. With ``push``, streams deltas and always ends with None."""
        try:
            return self._generate_text(payload, push, cancel)
        finally:
            if push is not None:
                push(None)

    def _generate_text(
        self, payload: ChatInput, push: Push | None, cancel: threading.Event
    ) -> EngineResult:
        torch = self._torch
        params = payload.params
        prompt = self._prompt_ids(payload)
        max_new = params.max_tokens
        if self._max_positions is not None:
            room = self._max_positions - len(prompt)
            if room <= 0:
                raise PermanentError(
                    f"model {self._ref.name}: the prompt does not fit the model's context of "
                    f"{self._max_positions} tokens",
                    code=ErrorCode.BAD_REQUEST,
                    model=self._ref.name,
                )
            # Generation past the context is impossible: cap it and report "length".
            max_new = min(max_new, room)
        input_ids = torch.tensor([prompt], dtype=torch.long)
        stopper = _StopOnText(self._tokenizer, len(prompt), params.stop, cancel)
        streamer = _DeltaStreamer(self._tokenizer, params.stop, push) if push else None
        config = self._generation_config(params, max_new)
        with self._lock, torch.inference_mode():
            if cancel.is_set():
                raise asyncio.CancelledError  # abandoned while waiting for the lock
            torch.manual_seed(params.seed if params.seed is not None else 0)
            sequences = self._model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=self._transformers.StoppingCriteriaList([stopper]),
                streamer=streamer,
            )
        generated = [int(t) for t in sequences[0, len(prompt) :].tolist()]
        text = self._tokenizer.decode(generated, skip_special_tokens=True)
        cut = earliest_stop(text, params.stop)
        finish: Literal["stop", "length"]
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif generated and generated[-1] in self._eos_ids:
            finish = "stop"
        else:
            finish = "length"
        if streamer is not None and push is not None:
            try:
                tail = streamer.stream.finish(text)
            except StreamDivergedError as e:
                raise PermanentError(
                    f"model {self._ref.name}: streamed text diverged from the final decode",
                    code=ErrorCode.INTERNAL,
                    model=self._ref.name,
                ) from e
            if tail:
                push(tail)
        return EngineResult(
            output=ChatOutput(text=text, finish_reason=finish),
            usage=Usage(input_tokens=len(prompt), output_tokens=len(generated)),
        )

    def _generation_config(self, params: SamplingParams, max_new: int) -> Any:
        sampling: dict[str, Any] = {"do_sample": False}
        if (params.temperature or 0.0) > 0:
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": 1.0 if params.top_p is None else params.top_p,
                "top_k": params.top_k if params.top_k is not None else 0,
            }
        return self._transformers.GenerationConfig(
            max_new_tokens=max_new,
            eos_token_id=sorted(self._eos_ids) or None,
            pad_token_id=self._pad_id,
            **sampling,
        )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(int(v) for v in value)
    return found


class _DeltaStreamer:
    """A transformers streamer (``put``/``end``): decodes each new token and pushes the text
    that is safe to send. The first ``put`` is the prompt, which is not part of the answer."""

    def __init__(self, tokenizer: Any, stops: list[str], push: Push) -> None:
        self._decoder = IncrementalDecoder(
            lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))
        )
        self.stream = TextStream(stops)
        self._push = push
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        text = self._decoder.push([int(t) for t in value.reshape(-1).tolist()])
        if delta := self.stream.update(text):
            self._push(delta)

    def end(self) -> None:
        return None  # the final text is flushed by the engine, after the stop-sequence cut


class _StopOnText:
    """A transformers stopping criterion: true once a stop string appears in the output, or
    once the request was abandoned (``cancel``).

    Only the last ``_STOP_TAIL_TOKENS`` tokens are decoded per step (cheap); a hit there is
    confirmed on the whole output, because a tail that starts mid-character can decode to
    U+FFFD and match a stop string the full text does not contain.
    """

    def __init__(
        self, tokenizer: Any, prompt_len: int, stops: list[str], cancel: threading.Event
    ) -> None:
        self._tokenizer = tokenizer
        self._prompt_len = prompt_len
        self._stops = stops
        self._cancel = cancel

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = self._cancel.is_set()
        if self._stops and not done:
            generated = input_ids[0, self._prompt_len :]
            tail = self._decode(generated[-_STOP_TAIL_TOKENS:])
            if earliest_stop(tail, self._stops) is not None:
                done = earliest_stop(self._decode(generated), self._stops) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    def _decode(self, ids: Any) -> str:
        text: str = self._tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        return text


# -- chat text helpers, shared with the vLLM engine -----------------------------------------


class StreamDivergedError(Exception):
    """The final text does not start with what was already streamed (a tokenizer whose
    decode is not prefix-stable); the request must fail rather than contradict its chunks."""


def earliest_stop(text: str, stops: list[str]) -> int | None:
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(positions) if positions else None


class TextStream:
    """Turns the growing decoded text of a generation into deltas that are safe to send.

    Held back: a trailing U+FFFD (a multi-byte character whose last bytes are still to come),
    and any tail that is the start of a stop sequence (it may yet complete one, and the final
    text is cut before a stop). Nothing at or past a complete stop sequence is ever sent. So
    whatever ``update`` returns is a prefix of the final text; ``finish`` returns the rest.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self.sent = ""

    def update(self, text: str) -> str:
        """``text``: everything decoded so far. Returns the new safe delta ('' if none)."""
        text = text.rstrip("\ufffd")
        cut = earliest_stop(text, self._stops)
        safe_end = cut if cut is not None else len(text) - _partial_stop(text, self._stops)
        if safe_end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent) : safe_end]
        self.sent += delta
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` after what was sent."""
        if not final_text.startswith(self.sent):
            raise StreamDivergedError
        delta = final_text[len(self.sent) :]
        self.sent = final_text
        return delta


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class IncrementalDecoder:
    """Detokenises one token at a time without re-decoding the whole output each step.

    The prefix/read offset technique (as in vLLM and text-generation-inference): decode a short
    window before and after the new tokens and keep the difference, so tokenizers whose pieces
    depend on their neighbours (leading-space markers) still decode the same as a whole. Text
    is only advanced when it does not end in U+FFFD, so a character split across tokens is
    never emitted half-decoded.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def push(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self.text


def refuse_unsupported_chat(model: str, payload: ChatInput) -> None:
    """``invalid_request`` for what a plain sampling engine cannot honour: tool calling,
    tool messages in the history, and JSON response formats."""
    problem = None
    if payload.tools and payload.tool_choice != "none":
        problem = "tool calling"
    elif any(m.role == "tool" or m.tool_calls for m in payload.messages):
        problem = "tool messages"
    elif payload.response_format is not None and payload.response_format.type != "text":
        problem = f"response_format {payload.response_format.type}"
    if problem is not None:
        raise PermanentError(
            f"model {model} does not support {problem}",
            code=ErrorCode.INVALID_REQUEST,
            model=model,
        )
