"""Replies on the reply topic: a signed result or a typed error. Kafka key: ``request_id``.

Every request gets exactly one terminal reply (a redelivery after a crash may repeat it with the
same ``request_id``; clients drop the copy).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from schemas import limits
from schemas.base import Hex32, Hex64, ModelName, RequestId, UnixMs, VerificationMode, WireModel
from schemas.canonical import sha256_hex
from schemas.requests import Tensor, TensorName, ToolCall, ToolCallDelta
from schemas.sealed import Base64
from schemas.version import SCHEMA_VERSION

__all__ = [
    "ChatOutput",
    "ErrorCode",
    "ErrorReply",
    "FinishReason",
    "InferenceResult",
    "MLOutput",
    "Output",
    "Reply",
    "ResultEnvelope",
    "SealedResult",
    "StreamChunk",
    "Usage",
    "output_hash",
]


class Usage(WireModel):
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class ChatOutput(WireModel):
    """What the model answered: text and/or tool calls. ``output_hash`` covers all of it."""

    kind: Literal["chat"] = "chat"
    text: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: FinishReason


class MLOutput(WireModel):
    kind: Literal["ml"] = "ml"
    tensors: dict[TensorName, Tensor]


Output = Annotated[ChatOutput | MLOutput, Field(discriminator="kind")]


class ResultEnvelope(WireModel):
    """The fields a node signs. It carries hashes, never the prompt or the output itself, so it
    can travel to settlement and on chain without revealing user data."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId
    model_id: ModelName
    model_digest: Hex32
    mode: VerificationMode
    input_hash: Hex32
    output_hash: Hex32
    usage: Usage
    payer: RequestId | None = None
    node_id: Hex32
    signed_unix_ms: UnixMs


class InferenceResult(WireModel):
    """A successful answer: the output plus the signed envelope that commits to it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["result"] = "result"
    request_id: RequestId
    envelope: ResultEnvelope
    signature: Hex64
    output: Output


class ErrorCode(StrEnum):
    """What went wrong, by what the client should do about it."""

    BAD_REQUEST = "bad_request"
    """The message is not a valid request; do not retry unchanged."""
    UNKNOWN_MODEL = "unknown_model"
    UNSUPPORTED_MODE = "unsupported_mode"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    PROVIDER_ERROR = "provider_error"
    """The upstream provider (LLM proxy) failed; retrying later may succeed."""
    RATE_LIMITED = "rate_limited"
    """The node or its provider is over its rate limit; retry after a pause."""
    INVALID_REQUEST = "invalid_request"
    """Well-formed, but this model or provider cannot do what it asks (e.g. an unsupported
    parameter, bad tensor shape); do not retry unchanged."""
    TIMEOUT = "timeout"
    """The engine or provider did not answer in time; retrying may succeed."""
    CONTENT_FILTERED = "content_filtered"
    """The provider refused the content."""
    SEALING_REQUIRED = "sealing_required"
    """The model is private: only sealed requests are accepted."""
    NOT_A_RECIPIENT = "not_a_recipient"
    """The sealed request names no content key for this node; another node must answer."""
    BAD_CIPHERTEXT = "bad_ciphertext"
    """The sealed request cannot be opened (tampered or malformed ciphertext)."""
    OUTPUT_TOO_LARGE = "output_too_large"
    """The answer is larger than the largest message the node may publish; ask for less."""
    INTERNAL = "internal"
    """The node failed; retrying later may succeed."""


class ErrorReply(WireModel):
    """A typed error. ``message`` never contains user data (prompts, outputs, inputs)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["error"] = "error"
    request_id: RequestId
    model: str = Field(max_length=limits.MAX_ID_CHARS)
    code: ErrorCode
    message: str = Field(max_length=limits.MAX_ERROR_MESSAGE_CHARS)
    retryable: bool = False
    node_id: Hex32 | None = None
    created_unix_ms: UnixMs


class StreamChunk(WireModel):
    """One piece of a streamed answer (``stream: true`` requests), sent before the final result.

    Chunks of a request are numbered from 0 and travel on the reply topic with the request id
    as key, so they stay in order on one partition; ``index`` lets a client detect a gap. They
    are not signed: the final ``InferenceResult`` is, and its ``output_hash`` covers the whole
    output, so a client checks the reassembled text against it.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["chunk"] = "chunk"
    request_id: RequestId
    index: int = Field(ge=0)
    text: str = ""
    """The next piece of ``ChatOutput.text``."""
    tool_calls: list[ToolCallDelta] = Field(default_factory=list)
    """Pieces of tool calls: ``arguments`` of deltas with the same ``index`` concatenate."""


class SealedResult(WireModel):
    """A result whose output only the client can read. Kafka key: ``request_id``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["sealed_result"] = "sealed_result"
    request_id: RequestId
    envelope: ResultEnvelope
    signature: Hex64
    sealed_output: Base64
    """``SealedBox(reply_public_key).encrypt(canonical(output))``; ``output_hash`` is over the
    opened output."""


Reply = Annotated[
    InferenceResult | SealedResult | ErrorReply | StreamChunk, Field(discriminator="type")
]


def output_hash(output: ChatOutput | MLOutput) -> str:
    """``output_hash``: hex sha256 of the RFC 8785 form of the output the client receives."""
    return sha256_hex(output)
