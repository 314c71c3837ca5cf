"""Inference requests: what clients produce to ``<ns>.infer.<model>``.

Two payload kinds share one request envelope, discriminated by ``payload.kind``:
``chat`` (an LLM conversation with sampling parameters) and ``ml`` (named tensors).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StringConstraints, model_validator

from schemas import limits
from schemas.base import (
    ModelName,
    RequestId,
    SettlementMode,
    TopicName,
    UnixMs,
    VerificationMode,
    WireModel,
)
from schemas.canonical import sha256_hex
from schemas.payer import Payer
from schemas.sealed import SealedInput
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = [
    "ChatInput",
    "ChatMessage",
    "FunctionCall",
    "FunctionSpec",
    "InferenceRequest",
    "JsonSchemaFormat",
    "MLInput",
    "NamedToolChoice",
    "Payload",
    "ResponseFormat",
    "SamplingParams",
    "Tensor",
    "TensorDType",
    "TensorName",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "input_hash",
    "max_output_tokens",
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
    """A dense tensor: ``data`` is the flat row-major list of ``prod(shape)`` elements.

    Elements of a float tensor may also be fixed-point numbers ``{"value": V, "decimals": D}``
    (OpenGradient's convention) meaning ``V / 10**D``, with ``V`` an I-JSON integer and
    ``0 <= D <= 38``: integers hash and travel exactly where decimal fractions may be rounded
    by some JSON stack. They are hashed as sent; the engine converts them to the float nearest
    ``V / 10**D`` (then to the tensor's dtype).
    """

    dtype: TensorDType
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=limits.MAX_TENSOR_RANK)
    data: list[bool | int | float | str | dict[str, Any]] = Field(
        max_length=limits.MAX_TENSOR_ELEMENTS
    )

    @model_validator(mode="after")
    def _check(self) -> Tensor:
        # Messages name the rule broken, never a value, size or count from the request.
        if math.prod(self.shape) != len(self.data):
            raise ValueError("the element count differs from the shape's")
        for value in self.data:
            if not _fits(self.dtype, value):
                if isinstance(value, dict):
                    raise ValueError(
                        'an element is not a fixed-point number {"value": int, "decimals": 0..38}'
                    )
                raise ValueError("an element does not fit the tensor's dtype")
        return self


def _fits(dtype: str, value: bool | int | float | str | dict[str, Any]) -> bool:
    if dtype == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if isinstance(value, dict):
        # Fixed point: exactly {value, decimals}, both JSON integers (never bools), only
        # in float tensors.
        if dtype not in _FLOAT_DTYPES or set(value) != {"value", "decimals"}:
            return False
        number, decimals = value["value"], value["decimals"]
        return (
            isinstance(number, int)
            and not isinstance(number, bool)
            and -MAX_SAFE_INT <= number <= MAX_SAFE_INT
            and isinstance(decimals, int)
            and not isinstance(decimals, bool)
            and 0 <= decimals <= 38  # the Tensor docstring's bound
        )
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


ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
ToolCallId = Annotated[str, StringConstraints(min_length=1, max_length=limits.MAX_ID_CHARS)]


class FunctionCall(WireModel):
    """A function the model chose to call; ``arguments`` is JSON text, as the model wrote it."""

    name: ToolName
    arguments: str = Field(max_length=limits.MAX_TOOL_ARGUMENTS_CHARS)


class ToolCall(WireModel):
    id: ToolCallId
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(WireModel):
    """A piece of a streamed tool call: ``id`` and ``name`` come once, ``arguments`` in parts."""

    index: int = Field(ge=0, lt=limits.MAX_TOOL_CALLS)
    id: ToolCallId | None = None
    name: ToolName | None = None
    arguments: str = ""


class FunctionSpec(WireModel):
    name: ToolName
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    """A JSON Schema object for the arguments."""
    strict: bool | None = None


class Tool(WireModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class _NamedFunction(WireModel):
    name: ToolName


class NamedToolChoice(WireModel):
    type: Literal["function"] = "function"
    function: _NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class JsonSchemaFormat(WireModel):
    name: ToolName
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = WireModel.model_config | {"populate_by_name": True, "serialize_by_alias": True}


class _TextFormat(WireModel):
    type: Literal["text"] = "text"


class _JsonObjectFormat(WireModel):
    type: Literal["json_object"] = "json_object"


class _JsonSchemaResponseFormat(WireModel):
    type: Literal["json_schema"] = "json_schema"
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    _TextFormat | _JsonObjectFormat | _JsonSchemaResponseFormat, Field(discriminator="type")
]


class ChatMessage(WireModel):
    """One message, OpenAI-style. ``content`` may be null only for an assistant message that
    carries ``tool_calls``; a ``tool`` message answers the call named by ``tool_call_id``."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(default=None, max_length=limits.MAX_PROMPT_CHARS)
    name: ToolName | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=limits.MAX_TOOL_CALLS)
    tool_call_id: ToolCallId | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("only tool messages carry tool_call_id")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required unless the message carries tool_calls")
        return self


class SamplingParams(WireModel):
    """Sampling controls. ``temperature == 0`` means greedy decoding.

    ``temperature`` and ``top_p`` left null mean "the engine's default": greedy (0) and 1.0 on
    local engines, the provider's own default on a proxied model. A provider that cannot honour
    a value that *is* set refuses the request (``invalid_request``) rather than ignore it."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    max_tokens: int = Field(default=64, ge=1, le=limits.MAX_NEW_TOKENS)
    stop: list[
        Annotated[str, StringConstraints(min_length=1, max_length=limits.MAX_STOP_CHARS)]
    ] = Field(default_factory=list, max_length=limits.MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


class ChatInput(WireModel):
    """An LLM conversation (OpenAI chat-completions style).

    ``user`` is accepted for compatibility but never forwarded: the proxy strips client
    identifiers before calling a provider.
    """

    kind: Literal["chat"] = "chat"
    messages: list[ChatMessage] = Field(min_length=1, max_length=limits.MAX_CHAT_MESSAGES)
    params: SamplingParams = Field(default_factory=SamplingParams)
    tools: list[Tool] | None = Field(default=None, max_length=limits.MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(default=None, max_length=limits.MAX_ID_CHARS)

    @model_validator(mode="after")
    def _total_size(self) -> ChatInput:
        if sum(len(m.content or "") for m in self.messages) > limits.MAX_PROMPT_CHARS:
            raise ValueError("the conversation is longer than the limit")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice needs tools")
        schemas = [t.function.parameters for t in self.tools or () if t.function.parameters]
        if self.response_format is not None and self.response_format.type == "json_schema":
            schemas.append(self.response_format.json_schema.schema_)
        if sum(_json_chars(s) for s in schemas) > limits.MAX_TOOL_SCHEMA_CHARS:
            raise ValueError("the tool and response schemas are longer than the limit")
        return self


def _json_chars(value: dict[str, Any]) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


Payload = Annotated[ChatInput | MLInput | SealedInput, Field(discriminator="kind")]


class InferenceRequest(WireModel):
    """One inference request. Kafka key: ``request_id``.

    ``reply_to`` defaults to the namespace's shared replies topic; clients at scale name their
    own. ``deadline_unix_ms`` is absolute wall-clock time: a worker that picks the request up
    later answers ``deadline_exceeded`` without running it.
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["inference_request"] = "inference_request"
    request_id: RequestId
    model: ModelName
    mode: VerificationMode = VerificationMode.VANILLA
    settlement: SettlementMode = SettlementMode.BATCH
    reply_to: TopicName | None = None
    created_unix_ms: UnixMs
    """Workers and settlement refuse requests created too long ago (a replay years later)."""
    deadline_unix_ms: UnixMs | None = None
    payer: Payer | None = None
    """Who pays, with their signature over this request's ``PayerGrant`` (``schemas.payer``);
    None: billed to nobody."""
    stream: StrictBool = False
    """Send ``StreamChunk`` messages while generating (chat models), then the final result."""
    payload: Payload


def max_output_tokens(payload: ChatInput | MLInput) -> int | None:
    """The output budget a request grants: ``params.max_tokens`` for chat, None for ML."""
    return payload.params.max_tokens if isinstance(payload, ChatInput) else None


def input_hash(payload: ChatInput | MLInput | SealedInput | dict[str, Any]) -> str:
    """``input_hash``: hex sha256 of the RFC 8785 form of the request's ``payload`` object.

    Workers hash the payload object exactly as it arrived (a dict), so a producer that omits
    optional fields can recompute the hash from what it sent; for a model instance the hash
    is over its full JSON form, which is what the client library sends.
    """
    return sha256_hex(payload)
