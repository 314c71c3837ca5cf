"""Everything a node answers, signed (and, for sealed requests, sealed): results, errors and
stream chunks. No Kafka, no engines: the pipeline decides what to answer, this builds it.

- a result: the envelope signed twice over one digest (ed25519 by the node id; EIP-191 by the
  node's chain key, checkable by ``ecrecover``), plus the settlement record;
- an error: signed over its JSON form without the signature, naming the payload's input hash
  when the node could compute it, so a client binds it to the request it sent;
- a chunk: signed the same way, numbered by the pipeline.

A reply to a sealed request goes out sealed to the client's one-time key: a result's output
(``SealedResult``, the envelope stays in clear for settlement), an error or a chunk whole
(``SealedReply``). Messages of errors never contain anything taken from the request.
"""

from __future__ import annotations

from collections.abc import Callable

from nacl.public import PublicKey

from schemas import limits
from schemas.requests import InferenceRequest, ToolCallDelta
from schemas.results import (
    ChatOutput,
    ErrorCode,
    ErrorReply,
    InferenceResult,
    MLOutput,
    ResultEnvelope,
    SealedReply,
    SealedResult,
    StreamChunk,
    Usage,
    output_hash,
)
from schemas.sealing import NodeSealer
from schemas.settlement import SettlementRecord
from schemas.signing import ChainSigner, Signer, chunk_digest, envelope_digest, error_digest
from schemas.version import SCHEMA_VERSION

__all__ = ["Answers"]


class Answers:
    def __init__(
        self, signer: Signer, chain_signer: ChainSigner, clock_ms: Callable[[], int]
    ) -> None:
        self._signer = signer
        self._chain = chain_signer
        self._clock_ms = clock_ms

    @property
    def node_id(self) -> str:
        return self._signer.node_id

    def error(
        self,
        request_id: str,
        model: str,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        input_hash: str | None = None,
        reply_key: PublicKey | None = None,
    ) -> ErrorReply | SealedReply:
        fields = {
            "schema_version": SCHEMA_VERSION,
            "type": "error",
            "request_id": request_id,
            "model": model[: limits.MAX_ID_CHARS],
            "code": code.value,
            "message": message[: limits.MAX_ERROR_MESSAGE_CHARS],
            "retryable": retryable,
            "node_id": self._signer.node_id,
            "input_hash": input_hash,
            "created_unix_ms": self._clock_ms(),
        }
        signature = self._signer.sign_digest(error_digest(fields))
        reply = ErrorReply.model_validate({**fields, "signature": signature})
        return reply if reply_key is None else NodeSealer.seal_reply(reply, reply_key)

    def chunk(
        self,
        request_id: str,
        index: int,
        text: str,
        tool_calls: list[ToolCallDelta],
        reply_key: PublicKey | None = None,
    ) -> StreamChunk | SealedReply:
        fields = {
            "schema_version": SCHEMA_VERSION,
            "type": "chunk",
            "request_id": request_id,
            "index": index,
            "text": text,
            "tool_calls": [t.model_dump(mode="json") for t in tool_calls],
            "node_id": self._signer.node_id,
        }
        signature = self._signer.sign_digest(chunk_digest(fields))
        chunk = StreamChunk.model_validate({**fields, "signature": signature})
        return chunk if reply_key is None else NodeSealer.seal_reply(chunk, reply_key)

    def result(
        self,
        request: InferenceRequest,
        *,
        model_digest: str,
        input_hash: str,
        max_output_tokens: int | None,
        output: ChatOutput | MLOutput,
        usage: Usage,
        reply_key: PublicKey | None,
    ) -> tuple[InferenceResult | SealedResult, SettlementRecord]:
        envelope = ResultEnvelope(
            request_id=request.request_id,
            model_id=request.model,
            model_digest=model_digest,
            mode=request.mode,
            settlement=request.settlement,
            input_hash=input_hash,
            output_hash=output_hash(output),
            usage=usage,
            request_created_unix_ms=request.created_unix_ms,
            max_output_tokens=max_output_tokens,
            payer=request.payer,
            node_id=self._signer.node_id,
            signed_unix_ms=self._clock_ms(),
        )
        digest = envelope_digest(envelope)
        signature = self._signer.sign_digest(digest)
        chain_signature = self._chain.sign_digest(digest)
        record = SettlementRecord(
            envelope=envelope, signature=signature, chain_signature=chain_signature
        )
        if reply_key is not None:
            sealed = SealedResult(
                request_id=request.request_id,
                envelope=envelope,
                signature=signature,
                chain_signature=chain_signature,
                sealed_output=NodeSealer.seal_output(output, reply_key),
            )
            return sealed, record
        plain = InferenceResult(
            request_id=request.request_id,
            envelope=envelope,
            signature=signature,
            chain_signature=chain_signature,
            output=output,
        )
        return plain, record
