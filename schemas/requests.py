"""Inference requests: what clients produce to ``<ns>.infer.<model>``.

Two payload kinds share one request envelope, discriminated by ``payload.kind``:
``chat`` (an LLM conversation with sampling parameters) and ``ml`` (named tensors).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from schemas import limits
from schemas.base import ModelName, RequestId, TopicName, UnixMs, VerificationMode, WireModel
from schemas.canonical import sha256_hex
from schemas.version import SCHEMA_VERSION

__all__ = [
    "ChatInput",
    "ChatMessage",
    "InferenceRequest",
    "MLInput",
    "Payload",
    "SamplingParams",
    "Tensor",
    "TensorDType",
    "TensorName",
    "input_hash",
]

TensorDType = Literal["float32", "float64", "int32", "int64", "bool", "string"]
_FLOAT_DTYPES = {"float32", "float64"}
_INT_DTYPES = {"int32", "int64"}
# JSON integers are limited to the exactly representable range (I-JSON, RFC 7493): RFC 8785
# cannot canonicalise anything larger, and every implementation must hash the same digits.
MAX_SAFE_INT = 2**53 - 1
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-MAX_SAFE_INT, MAX_SAFE_INT)}
TensorName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")]


class Tensor(WireModel):
    """A dense tensor: ``data`` is the flat row-major list of ``prod(shape)`` elements."""

    dtype: TensorDType
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=limits.MAX_TENSOR_RANK)
    data: list[bool | int | float | str] = Field(max_length=limits.MAX_TENSOR_ELEMENTS)

    @model_validator(mode="after")
    def _check(self) -> Tensor:
        if math.prod(self.shape) != len(self.data):
            raise ValueError(
                f"shape {self.shape} needs {math.prod(self.shape)} elements, got {len(self.data)}"
            )
        for value in self.data:
            if not _fits(self.dtype, value):
                raise ValueError(f"element of type {type(value).__name__} is not {self.dtype}")
        return self


def _fits(dtype: str, value: bool | int | float | str) -> bool:
    if dtype == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if dtype in _FLOAT_DTYPES:
        return isinstance(value, float) or (
            isinstance(value, int) and -MAX_SAFE_INT <= value <= MAX_SAFE_INT
        )
    if dtype in _INT_DTYPES:
        low, high = _INT_RANGE[dtype]
        return isinstance(value, int) and low <= value <= high
    return isinstance(value, str) and len(value) <= limits.MAX_STRING_ELEMENT_CHARS


class MLInput(WireModel):
    """Named input tensors for a classical ML model (ONNX)."""

    kind: Literal["ml"] = "ml"
    tensors: dict[TensorName, Tensor] = Field(min_length=1, max_length=limits.MAX_TENSORS)


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=limits.MAX_PROMPT_CHARS)


class SamplingParams(WireModel):
    """Sampling controls. ``temperature == 0`` means greedy decoding."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    max_tokens: int = Field(default=64, ge=1, le=limits.MAX_NEW_TOKENS)
    stop: list[
        Annotated[str, StringConstraints(min_length=1, max_length=limits.MAX_STOP_CHARS)]
    ] = Field(default_factory=list, max_length=limits.MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


class ChatInput(WireModel):
    """An LLM conversation."""

    kind: Literal["chat"] = "chat"
    messages: list[ChatMessage] = Field(min_length=1, max_length=limits.MAX_CHAT_MESSAGES)
    params: SamplingParams = Field(default_factory=SamplingParams)

    @model_validator(mode="after")
    def _total_size(self) -> ChatInput:
        if sum(len(m.content) for m in self.messages) > limits.MAX_PROMPT_CHARS:
            raise ValueError(f"conversation longer than {limits.MAX_PROMPT_CHARS} characters")
        return self


Payload = Annotated[ChatInput | MLInput, Field(discriminator="kind")]


class InferenceRequest(WireModel):
    """One inference request. Kafka key: ``request_id``.

    ``reply_to`` defaults to the namespace's shared replies topic; clients at scale name their
    own. ``deadline_unix_ms`` is absolute wall-clock time: a worker that picks the request up
    later answers ``deadline_exceeded`` without running it.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["inference_request"] = "inference_request"
    request_id: RequestId
    model: ModelName
    mode: VerificationMode = VerificationMode.VANILLA
    reply_to: TopicName | None = None
    created_unix_ms: UnixMs
    deadline_unix_ms: UnixMs | None = None
    payer: RequestId | None = None
    payload: Payload


def input_hash(payload: ChatInput | MLInput | dict[str, Any]) -> str:
    """``input_hash``: hex sha256 of the RFC 8785 form of the request's ``payload`` object.

    Workers hash the payload object exactly as it arrived (a dict), so a producer that omits
    optional fields can recompute the hash from what it sent; for a model instance the hash
    is over its full JSON form, which is what the client library sends.
    """
    return sha256_hex(payload)
