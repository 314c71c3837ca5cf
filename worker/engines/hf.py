"""CPU causal-LM engine on torch + transformers, for small models saved with ``save_pretrained``.

Determinism matters more than throughput here: a verifier must be able to re-run a request and
get the same text. So generation is serialised per engine (one ``generate`` at a time, under a
lock) and the global torch RNG is seeded with ``params.seed`` (0 when absent) right before each
call, inside the lock. Greedy decoding when ``temperature == 0``, sampling otherwise.

Stop sequences are matched on the decoded text: a stopping criterion ends generation as soon as
one appears, and the text is cut before the earliest occurrence. ``usage.output_tokens`` counts
every token the model generated, including the ones that spelled the stop sequence or the
end-of-sequence token (the work done, not the length of the returned text).

torch and transformers are imported lazily so the worker runs ONNX-only without them.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Literal

from schemas.requests import ChatInput, MLInput, SamplingParams
from schemas.results import ChatOutput, ErrorCode, Usage
from worker.engines.base import EngineResult, RunContext
from worker.errors import PermanentError
from worker.models.refs import ModelRef

__all__ = ["HFCausalLMEngine"]

_INSTALL_HINT = "pip install 'verifiable-inference-node[cpu]'"
_TORCH_THREADS = 1
# Tokens decoded when checking the tail of the output for a stop string: enough for the longest
# stop sequence (limits.MAX_STOP_CHARS) even if every token decodes to a single character.
_STOP_TAIL_TOKENS = 72


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

    def __init__(self, ref: ModelRef, path: Path) -> None:
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
        self._max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._eos_ids = _eos_ids(model, self._tokenizer)
        pad = self._tokenizer.pad_token_id
        self._pad_id: int | None = pad if pad is not None else next(iter(self._eos_ids), None)

    @classmethod
    async def load(cls, ref: ModelRef, path: Path) -> HFCausalLMEngine:
        return await asyncio.to_thread(cls, ref, path)

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
        return await asyncio.to_thread(self._generate, payload)

    async def close(self) -> None:
        return None

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

    def _generate(self, payload: ChatInput) -> EngineResult:
        torch = self._torch
        params = payload.params
        prompt = self._prompt_ids(payload)
        max_new = params.max_tokens
        if self._max_positions is not None:
            room = self._max_positions - len(prompt)
            if room <= 0:
                raise PermanentError(
                    f"model {self._ref.name}: prompt is {len(prompt)} tokens, the model's "
                    f"context is {self._max_positions}",
                    code=ErrorCode.BAD_REQUEST,
                    model=self._ref.name,
                )
            # Generation past the context is impossible: cap it and report "length".
            max_new = min(max_new, room)
        input_ids = torch.tensor([prompt], dtype=torch.long)
        stopper = _StopOnText(self._tokenizer, len(prompt), params.stop)
        config = self._generation_config(params, max_new)
        with self._lock, torch.inference_mode():
            torch.manual_seed(params.seed if params.seed is not None else 0)
            sequences = self._model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=self._transformers.StoppingCriteriaList([stopper]),
            )
        generated = [int(t) for t in sequences[0, len(prompt) :].tolist()]
        text = self._tokenizer.decode(generated, skip_special_tokens=True)
        cut = _earliest_stop(text, params.stop)
        finish: Literal["stop", "length"]
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif generated and generated[-1] in self._eos_ids:
            finish = "stop"
        else:
            finish = "length"
        return EngineResult(
            output=ChatOutput(text=text, finish_reason=finish),
            usage=Usage(input_tokens=len(prompt), output_tokens=len(generated)),
        )

    def _generation_config(self, params: SamplingParams, max_new: int) -> Any:
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
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


def _earliest_stop(text: str, stops: list[str]) -> int | None:
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(positions) if positions else None


class _StopOnText:
    """A transformers stopping criterion: true once a stop string appears in the output.

    Only the last ``_STOP_TAIL_TOKENS`` tokens are decoded per step (cheap); a hit there is
    confirmed on the whole output, because a tail that starts mid-character can decode to
    U+FFFD and match a stop string the full text does not contain.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stops: list[str]) -> None:
        self._tokenizer = tokenizer
        self._prompt_len = prompt_len
        self._stops = stops

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = False
        if self._stops:
            generated = input_ids[0, self._prompt_len :]
            tail = self._decode(generated[-_STOP_TAIL_TOKENS:])
            if _earliest_stop(tail, self._stops) is not None:
                done = _earliest_stop(self._decode(generated), self._stops) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    def _decode(self, ids: Any) -> str:
        text: str = self._tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        return text
