"""Execute → hash → sign. Knows nothing about Kafka: it maps a request to the reply and the
settlement record to publish, and is tested without a broker.

Expected rejections (unknown model, deadline passed, bad input) are returned as ``ErrorReply``
values, not raised: every request ends in exactly one ``Outcome``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from nacl.public import PublicKey

from schemas.base import VerificationMode
from schemas.requests import ChatInput, InferenceRequest, MLInput, input_hash
from schemas.results import (
    ErrorCode,
    ErrorReply,
    InferenceResult,
    ResultEnvelope,
    SealedResult,
    StreamChunk,
    output_hash,
)
from schemas.sealed import SealedInput
from schemas.sealing import BadCiphertext, BadPlaintext, NodeSealer, NotARecipient
from schemas.settlement import SettlementRecord
from schemas.signing import Signer
from worker.engines.base import Delta, Engine, EngineResult, RunContext
from worker.errors import PermanentError, RetryableError, WorkerError

__all__ = ["ChunkSink", "ModeHandler", "Outcome", "Pipeline"]

ChunkSink = Callable[[StreamChunk], Awaitable[None]]
"""Where a streamed request's chunks go (the publisher, for the request's reply topic)."""

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ModeHandler(Protocol):
    """What a verification mode beyond VANILLA adds (TEE: attestation; ZKML: proofs).

    ``accepts`` says whether this node can serve ``model`` in the mode (a request it cannot
    serve gets ``unsupported_mode``). ``signed`` runs after the result is signed and must not
    block: proof generation, for one, is queued and published later on the settlement topic.
    """

    def accepts(self, model: str) -> bool: ...

    def signed(
        self, request: InferenceRequest, result: EngineResult, envelope: ResultEnvelope
    ) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """What to publish for one request: always a reply; a settlement record on success."""

    reply: InferenceResult | SealedResult | ErrorReply
    record: SettlementRecord | None = None


class Pipeline:
    def __init__(
        self,
        engines: Mapping[str, Engine],
        signer: Signer,
        *,
        retries: int = 2,
        retry_backoff_s: float = 0.1,
        clock_ms: Callable[[], int] = _now_ms,
        modes: Mapping[VerificationMode, ModeHandler] | None = None,
        sealer: NodeSealer | None = None,
        private_models: frozenset[str] = frozenset(),
        max_execution_s: float = 300.0,
    ) -> None:
        """``sealer`` opens sealed requests (no sealer: they are refused); ``private_models``
        accept sealed requests only."""
        self._engines = engines
        self.fatal: WorkerError | None = None
        """Set when an engine reported a fatal failure; intake stops the worker on it."""
        self._sealer = sealer
        self._private_models = private_models
        self._modes = dict(modes or {})
        self._signer = signer
        self._retries = retries
        self._backoff_s = retry_backoff_s
        self._clock_ms = clock_ms
        self._max_execution_s = max_execution_s

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
    ) -> ErrorReply:
        return ErrorReply(
            request_id=request_id,
            model=model[:128],
            code=code,
            message=message[:512],
            retryable=retryable,
            node_id=self._signer.node_id,
            created_unix_ms=self._clock_ms(),
        )

    async def handle(
        self,
        request: InferenceRequest,
        payload_document: dict[str, Any] | None = None,
        *,
        chunks: ChunkSink | None = None,
    ) -> Outcome:
        """Run one request. ``payload_document`` is the payload object as received (see
        ``schemas.requests.input_hash``); without it the normalised payload is hashed.
        ``chunks`` receives the ``StreamChunk`` messages of a ``stream`` request."""
        engine = self._engines.get(request.model)
        if engine is None:
            return Outcome(
                self.error(
                    request.request_id,
                    request.model,
                    ErrorCode.UNKNOWN_MODEL,
                    "this node does not serve the model",
                )
            )
        mode = self._modes.get(request.mode)
        if request.mode is not VerificationMode.VANILLA and (
            mode is None or not mode.accepts(request.model)
        ):
            return Outcome(
                self.error(
                    request.request_id,
                    request.model,
                    ErrorCode.UNSUPPORTED_MODE,
                    f"mode {request.mode.value} is not available on this node",
                )
            )
        if request.deadline_unix_ms is not None and self._clock_ms() >= request.deadline_unix_ms:
            return Outcome(
                self.error(
                    request.request_id,
                    request.model,
                    ErrorCode.DEADLINE_EXCEEDED,
                    "deadline passed before execution",
                )
            )
        opened = self._open(request, payload_document)
        if isinstance(opened, ErrorReply):
            return Outcome(opened)
        payload, document, reply_key = opened
        stream = _ChunkCounter(request.request_id, chunks) if request.stream and chunks else None
        ctx = RunContext(
            request_id=request.request_id,
            deadline_unix_ms=request.deadline_unix_ms,
            emit=stream.emit if stream is not None else None,
        )
        try:
            result = await self._bounded(
                request, self._run_with_retries(engine, request, payload, ctx, stream)
            )
        except WorkerError as e:
            if e.fatal and self.fatal is None:
                self.fatal = e
            return Outcome(
                self.error(
                    request.request_id, request.model, e.code, e.message, retryable=e.retryable
                )
            )
        try:
            return self._sign(request, engine, result, document, reply_key)
        except ValueError:
            # Canonicalisation refused a value (e.g. an integer outside the I-JSON range that
            # an engine echoed): answer, never crash the intake over one request.
            return Outcome(
                self.error(
                    request.request_id,
                    request.model,
                    ErrorCode.BAD_REQUEST,
                    "request or output cannot be canonicalised (RFC 8785)",
                )
            )

    async def _bounded(
        self, request: InferenceRequest, run: Coroutine[Any, Any, EngineResult]
    ) -> EngineResult:
        """``run`` within the request's deadline and ``max_execution_s``: a request stuck in an
        engine is answered (and aborted: engines abort on cancellation) instead of holding its
        partition's commits back for ever."""
        budget_s = self._max_execution_s
        by_deadline = False
        if request.deadline_unix_ms is not None:
            left_s = (request.deadline_unix_ms - self._clock_ms()) / 1000
            if left_s <= budget_s:
                budget_s, by_deadline = max(left_s, 0.0), True
        try:
            async with asyncio.timeout(budget_s):
                return await run
        except TimeoutError:
            if by_deadline:
                raise PermanentError(
                    "deadline passed during execution", code=ErrorCode.DEADLINE_EXCEEDED
                ) from None
            raise RetryableError(
                "execution exceeded the node's time limit", code=ErrorCode.TIMEOUT
            ) from None

    def _open(
        self, request: InferenceRequest, payload_document: dict[str, Any] | None
    ) -> tuple[ChatInput | MLInput, Any, PublicKey | None] | ErrorReply:
        """The payload to run, the document ``input_hash`` covers, and the key a sealed
        output goes to; or the typed error for a request that must not run."""
        payload = request.payload
        if not isinstance(payload, SealedInput):
            if request.model in self._private_models:
                return self._refuse(request, ErrorCode.SEALING_REQUIRED, "the model is private")
            return payload, payload if payload_document is None else payload_document, None
        if self._sealer is None:
            return self._refuse(
                request, ErrorCode.NOT_A_RECIPIENT, "this node has no key for sealed requests"
            )
        if request.stream:
            return self._refuse(
                request, ErrorCode.INVALID_REQUEST, "sealed requests cannot be streamed"
            )
        if request.mode is VerificationMode.ZKML:
            return self._refuse(
                request,
                ErrorCode.UNSUPPORTED_MODE,
                "ZKML proofs publish their inputs; a sealed request cannot use them",
            )
        opened = self._sealer.open(request, payload)
        if isinstance(opened, NotARecipient):
            # Retryable: the client sealed to a stale set of nodes and may re-seal.
            return self._refuse(
                request,
                ErrorCode.NOT_A_RECIPIENT,
                "the request is not sealed to this node",
                retryable=True,
            )
        if isinstance(opened, BadCiphertext):
            return self._refuse(request, ErrorCode.BAD_CIPHERTEXT, "the sealed payload is invalid")
        if isinstance(opened, BadPlaintext):
            return self._refuse(request, ErrorCode.BAD_REQUEST, opened.reason)
        return opened.payload, opened.document, opened.reply_key

    def _refuse(
        self, request: InferenceRequest, code: ErrorCode, message: str, *, retryable: bool = False
    ) -> ErrorReply:
        return self.error(request.request_id, request.model, code, message, retryable=retryable)

    async def _run_with_retries(
        self,
        engine: Engine,
        request: InferenceRequest,
        payload: ChatInput | MLInput,
        ctx: RunContext,
        stream: _ChunkCounter | None,
    ) -> EngineResult:
        attempt = 0
        while True:
            try:
                return await engine.run(payload, ctx)
            except PermanentError:
                raise
            except RetryableError:
                # A retry after chunks went out would repeat them: the client already holds
                # part of an answer, so it gets the error and decides.
                if attempt >= self._retries or (stream is not None and stream.sent > 0):
                    raise
            except Exception as e:
                # An unknown failure is not retried here: an engine bug would only repeat.
                # The reply says retryable, so the client may try again later (perhaps on
                # another node). Never log the exception text: runtimes echo inputs in it.
                log.error(
                    "engine failure",
                    extra={"request_id": request.request_id, "error_type": type(e).__name__},
                )
                raise RetryableError("internal engine error", code=ErrorCode.INTERNAL) from e
            attempt += 1
            await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))

    def _sign(
        self,
        request: InferenceRequest,
        engine: Engine,
        result: EngineResult,
        document: Any,
        reply_key: PublicKey | None,
    ) -> Outcome:
        envelope = ResultEnvelope(
            request_id=request.request_id,
            model_id=request.model,
            model_digest=engine.model_digest,
            mode=request.mode,
            input_hash=input_hash(document),
            output_hash=output_hash(result.output),
            usage=result.usage,
            payer=request.payer,
            node_id=self._signer.node_id,
            signed_unix_ms=self._clock_ms(),
        )
        signature = self._signer.sign_envelope(envelope)
        mode = self._modes.get(request.mode)
        if mode is not None:
            mode.signed(request, result, envelope)
        record = SettlementRecord(envelope=envelope, signature=signature)
        if reply_key is not None:
            sealed = SealedResult(
                request_id=request.request_id,
                envelope=envelope,
                signature=signature,
                sealed_output=NodeSealer.seal_output(result.output, reply_key),
            )
            return Outcome(sealed, record)
        reply = InferenceResult(
            request_id=request.request_id,
            envelope=envelope,
            signature=signature,
            output=result.output,
        )
        return Outcome(reply, record)


class _ChunkCounter:
    """Numbers a request's deltas into ``StreamChunk`` messages, in order."""

    def __init__(self, request_id: str, sink: ChunkSink) -> None:
        self._request_id = request_id
        self._sink = sink
        self.sent = 0

    async def emit(self, delta: Delta) -> None:
        if not delta.text and not delta.tool_calls:
            return
        chunk = StreamChunk(
            request_id=self._request_id,
            index=self.sent,
            text=delta.text,
            tool_calls=list(delta.tool_calls),
        )
        self.sent += 1
        await self._sink(chunk)
