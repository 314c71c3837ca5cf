"""Replies on the reply topic: a signed result or a typed error. Kafka key: ``request_id``.

Every request gets exactly one terminal reply (a redelivery after a crash may repeat it with the
same ``request_id``; clients drop the copy).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from schemas import limits
from schemas.base import (
    ChainSignature,
    Hex32,
    Hex64,
    ModelName,
    RequestId,
    SettlementMode,
    UnixMs,
    VerificationMode,
    WireModel,
)
from schemas.canonical import sha256_hex
from schemas.payer import Payer
from schemas.requests import Tensor, TensorName, ToolCall, ToolCallDelta
from schemas.sealed import Base64
from schemas.version import SCHEMA_VERSION, SchemaVersion

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
    "SealedReply",
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
    can travel to settlement and on chain without revealing user data.

    What it commits to beside the hashes comes from the request: its creation time (verifiers
    bound a record's age by it), its output budget and its payer's grant (settlement checks the
    usage against the budget and the payer's signature over both), its settlement mode."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: RequestId
    model_id: ModelName
    model_digest: Hex32
    mode: VerificationMode
    settlement: SettlementMode
    input_hash: Hex32
    output_hash: Hex32
    usage: Usage
    request_created_unix_ms: UnixMs
    max_output_tokens: int | None = Field(ge=1, le=limits.MAX_NEW_TOKENS)
    """The request's ``params.max_tokens`` (chat models); None for ML models."""
    payer: Payer | None
    node_id: Hex32
    signed_unix_ms: UnixMs


class InferenceResult(WireModel):
    """A successful answer: the output plus the signed envelope that commits to it."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["result"] = "result"
    request_id: RequestId
    envelope: ResultEnvelope
    signature: Hex64
    """ed25519 by ``envelope.node_id`` over the envelope digest."""
    chain_signature: ChainSignature
    """EIP-191 by the node's chain key over the same digest (checkable on chain)."""
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
    DUPLICATE_REQUEST = "duplicate_request"
    """Another request with this id was answered (or is being answered) by this node."""
    SEALED_MISMATCH = "sealed_mismatch"
    """The sealed plaintext does not bind the fields the request carries in clear."""
    BAD_PAYER = "bad_payer"
    """The payer's signature does not verify over this request's grant."""
    STALE_REQUEST = "stale_request"
    """The request was created too long ago (or too far in the future) to be served."""
    REPLY_TOPIC_REFUSED = "reply_topic_refused"
    """The reply topic is not one this deployment allows (or does not exist): the error goes
    to the namespace's shared replies topic instead."""
    NOT_ADMITTED = "not_admitted"
    """This node is not admitted (any more) by the network's authority."""
    INTERNAL = "internal"
    """The node failed; retrying later may succeed."""


class ErrorReply(WireModel):
    """A typed error, signed by the node that answers. ``message`` never contains anything
    taken from the request (no names, values, sizes or counts)."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["error"] = "error"
    request_id: RequestId
    model: str = Field(max_length=limits.MAX_ID_CHARS)
    code: ErrorCode
    message: str = Field(max_length=limits.MAX_ERROR_MESSAGE_CHARS)
    retryable: bool = False
    node_id: Hex32
    input_hash: Hex32 | None = None
    """Of the request's payload, when the node could compute it: binds the error to the
    request it answers (a forged or replayed error for another payload does not match)."""
    created_unix_ms: UnixMs
    signature: Hex64
    """ed25519 by ``node_id`` over ``domain_digest(ERROR_DOMAIN, <this object without
    signature>)``."""


class StreamChunk(WireModel):
    """One piece of a streamed answer (``stream: true`` requests), sent before the final result.

    Chunks of a request are numbered from 0 and travel on the reply topic with the request id
    as key, so they stay in order on one partition; ``index`` lets a client detect a gap. Each
    is signed by the answering node, and the final ``InferenceResult``'s ``output_hash`` covers
    the whole output, so a client checks the reassembled text against it too.
    """

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["chunk"] = "chunk"
    request_id: RequestId
    index: int = Field(ge=0)
    text: str = ""
    """The next piece of ``ChatOutput.text``."""
    tool_calls: list[ToolCallDelta] = Field(default_factory=list)
    """Pieces of tool calls: ``arguments`` of deltas with the same ``index`` concatenate."""
    node_id: Hex32
    signature: Hex64
    """ed25519 by ``node_id`` over ``domain_digest(CHUNK_DOMAIN, <this object without
    signature>)``."""


class SealedResult(WireModel):
    """A result whose output only the client can read. Kafka key: ``request_id``."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["sealed_result"] = "sealed_result"
    request_id: RequestId
    envelope: ResultEnvelope
    signature: Hex64
    chain_signature: ChainSignature
    sealed_output: Base64
    """``SealedBox(reply_public_key).encrypt(canonical(output))``; ``output_hash`` is over the
    opened output."""


class SealedReply(WireModel):
    """An error or a stream chunk answering a sealed request, sealed whole to the client's
    one-time key: ``sealed`` is ``SealedBox(reply_public_key).encrypt(JCS(reply))`` of a signed
    ``ErrorReply`` or ``StreamChunk``. Only the request id and the node show in clear."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["sealed_reply"] = "sealed_reply"
    request_id: RequestId
    node_id: Hex32
    sealed: Base64


Reply = Annotated[
    InferenceResult | SealedResult | ErrorReply | StreamChunk | SealedReply,
    Field(discriminator="type"),
]


def output_hash(output: ChatOutput | MLOutput) -> str:
    """``output_hash``: hex sha256 of the RFC 8785 form of the output the client receives."""
    return sha256_hex(output)
