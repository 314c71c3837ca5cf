"""Check → open → execute → hash → sign. Knows nothing about Kafka: it maps a request to the
reply and the settlement record to publish, and is tested without a broker.

Expected rejections are returned as signed error replies, not raised: every request ends in
exactly one ``Outcome``. Before anything runs, in order: the node serves the model, the mode
(TEE only on hardware evidence, ZKML only where a circuit exists), the node is admitted, the
request is not older than ``max_request_age_s`` (a replay years later) nor from the future,
its deadline has not passed, a sealed payload opens and binds every clear field the node acts
on (``schemas.sealed``), and a named payer signed this request's grant (``schemas.payer``).
Then the engine runs within the deadline and ``max_execution_s``; its output is hashed, and the
envelope signed with both node keys (``worker.answers``).

The input hash is computed once, from the payload object as received (or as sealed): the
producer can recompute it from what it sent, whatever defaults the node fills in.
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
from schemas.requests import ChatInput, InferenceRequest, MLInput, input_hash, max_output_tokens
from schemas.results import (
    ErrorCode,
    ErrorReply,
    InferenceResult,
    ResultEnvelope,
    SealedReply,
    SealedResult,
)
from schemas.sealed import SealedInput
from schemas.sealing import BadCiphertext, BadPlaintext, Mismatch, NodeSealer, NotARecipient
from schemas.settlement import SettlementRecord
from schemas.signing import ChainSigner, Signer
from schemas.verify.payer import request_grant, verify_payer
from worker.answers import Answers
from worker.engines.base import Delta, Engine, EngineResult, RunContext
from worker.errors import PermanentError, RetryableError, WorkerError

__all__ = ["ChunkSink", "ModeHandler", "Outcome", "Pipeline"]

ChunkSink = Callable[[Any], Awaitable[None]]
"""Where a streamed request's chunks go (``StreamChunk`` or, sealed, ``SealedReply``)."""

log = logging.getLogger(__name__)

_CLOCK_SKEW_MS = 300_000
"""How far in the future a request's ``created_unix_ms`` may be (producers' clocks drift)."""


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

    reply: InferenceResult | SealedResult | ErrorReply | SealedReply
    record: SettlementRecord | None = None
    reply_key: PublicKey | None = None
    """The key a sealed request's answers go to (for an error made later, e.g. too large)."""
    input_hash: str | None = None
    error_code: ErrorCode | None = None
    """The error's code when the reply is one (a sealed error does not show it)."""


@dataclass(frozen=True)
class _Refusal:
    code: ErrorCode
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class _Opened:
    payload: ChatInput | MLInput
    input_hash: str
    reply_key: PublicKey | None


class Pipeline:
    def __init__(
        self,
        engines: Mapping[str, Engine],
        signer: Signer,
        chain_signer: ChainSigner,
        *,
        retries: int = 2,
        retry_backoff_s: float = 0.1,
        clock_ms: Callable[[], int] = _now_ms,
        modes: Mapping[VerificationMode, ModeHandler] | None = None,
        sealer: NodeSealer | None = None,
        private_models: frozenset[str] = frozenset(),
        max_execution_s: float = 300.0,
        max_request_age_s: float = 3600.0,
        admitted: Callable[[], bool] = lambda: True,
    ) -> None:
        """``sealer`` opens sealed requests (no sealer: they are refused); ``private_models``
        accept sealed requests only; ``admitted`` says whether the admission authority counts
        this node now (a node it does not count answers ``not_admitted``)."""
        self._engines = engines
        self.fatal: WorkerError | None = None
        """Set when an engine reported a fatal failure; intake stops the worker on it."""
        self._sealer = sealer
        self._private_models = private_models
        self._modes = dict(modes or {})
        self._answers = Answers(signer, chain_signer, clock_ms)
        self.error = self._answers.error
        """A signed error (sealed to ``reply_key`` when given): ``Answers.error``."""
        self._retries = retries
        self._backoff_s = retry_backoff_s
        self._clock_ms = clock_ms
        self._max_execution_s = max_execution_s
        self._max_request_age_ms = max_request_age_s * 1000
        self._admitted = admitted

    @property
    def node_id(self) -> str:
        return self._answers.node_id

    async def handle(
        self,
        request: InferenceRequest,
        payload_document: dict[str, Any] | None = None,
        *,
        chunks: ChunkSink | None = None,
    ) -> Outcome:
        """Run one request. ``payload_document`` is the payload object as received (see
        ``schemas.requests.input_hash``); None means its full JSON form, which is what the
        client library sends. ``chunks`` receives a ``stream`` request's chunks."""
        outer_key = (
            PublicKey(bytes.fromhex(request.payload.reply_public_key))
            if isinstance(request.payload, SealedInput)
            else None
        )

        def refuse(refusal: _Refusal, digest: str | None = None) -> Outcome:
            reply = self.error(
                request.request_id,
                request.model,
                refusal.code,
                refusal.message,
                retryable=refusal.retryable,
                input_hash=digest,
                reply_key=outer_key,
            )
            return Outcome(reply, reply_key=outer_key, input_hash=digest, error_code=refusal.code)

        engine = self._engines.get(request.model)
        refusal = self._check(request, engine)
        if refusal is not None or engine is None:
            return refuse(refusal or _Refusal(ErrorCode.UNKNOWN_MODEL, "unknown model"))
        document = (
            request.payload.model_dump(mode="json")
            if payload_document is None
            else payload_document
        )
        opened = self._open(request, document)
        if isinstance(opened, _Refusal):
            return refuse(opened)
        digest = opened.input_hash
        if request.payer is not None and not verify_payer(
            request.payer, request_grant(request, opened.payload, digest)
        ):
            return refuse(_Refusal(ErrorCode.BAD_PAYER, "the payer's signature does not verify"))
        try:
            return await self._execute(request, engine, opened, chunks)
        except WorkerError as e:
            if e.fatal and self.fatal is None:
                self.fatal = e
            return refuse(_Refusal(e.code, e.message, e.retryable), digest)

    def _check(self, request: InferenceRequest, engine: Engine | None) -> _Refusal | None:
        """Why ``request`` must not run here (before anything is opened), or None."""
        if engine is None:
            return _Refusal(ErrorCode.UNKNOWN_MODEL, "this node does not serve the model")
        mode = self._modes.get(request.mode)
        if request.mode is not VerificationMode.VANILLA and (
            mode is None or not mode.accepts(request.model)
        ):
            message = f"mode {request.mode.value} is not available on this node"
            return _Refusal(ErrorCode.UNSUPPORTED_MODE, message)
        if not self._admitted():
            return _Refusal(ErrorCode.NOT_ADMITTED, "this node is not admitted", retryable=True)
        now = self._clock_ms()
        if request.created_unix_ms > now + _CLOCK_SKEW_MS or (
            request.created_unix_ms < now - self._max_request_age_ms
        ):
            return _Refusal(ErrorCode.STALE_REQUEST, "the request's creation time is out of bounds")
        if request.deadline_unix_ms is not None and now >= request.deadline_unix_ms:
            return _Refusal(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before execution")
        return None

    def _open(self, request: InferenceRequest, document: dict[str, Any]) -> _Opened | _Refusal:
        """The payload to run, its input hash and the key sealed answers go to; or why not."""
        payload = request.payload
        if not isinstance(payload, SealedInput):
            if request.model in self._private_models:
                return _Refusal(ErrorCode.SEALING_REQUIRED, "the model is private")
            return _hashed(payload, document, None)
        if self._sealer is None:
            return _Refusal(ErrorCode.NOT_A_RECIPIENT, "this node has no key for sealed requests")
        if request.mode is VerificationMode.ZKML:
            return _Refusal(
                ErrorCode.UNSUPPORTED_MODE,
                "ZKML proofs publish their inputs; a sealed request cannot use them",
            )
        opened = self._sealer.open(request, payload)
        if isinstance(opened, NotARecipient):
            # Retryable: the client sealed to a stale set of nodes and may re-seal.
            message = "the request is not sealed to this node"
            return _Refusal(ErrorCode.NOT_A_RECIPIENT, message, retryable=True)
        if isinstance(opened, BadCiphertext):
            return _Refusal(ErrorCode.BAD_CIPHERTEXT, "the sealed payload is invalid")
        if isinstance(opened, BadPlaintext):
            return _Refusal(ErrorCode.BAD_REQUEST, opened.reason)
        if isinstance(opened, Mismatch):
            message = "the sealed payload binds other fields than the request carries"
            return _Refusal(ErrorCode.SEALED_MISMATCH, message)
        return _hashed(opened.payload, opened.document, opened.reply_key)

    async def _execute(
        self,
        request: InferenceRequest,
        engine: Engine,
        opened: _Opened,
        chunks: ChunkSink | None,
    ) -> Outcome:
        stream = (
            _ChunkCounter(self._answers, request.request_id, chunks, opened.reply_key)
            if request.stream and chunks
            else None
        )
        ctx = RunContext(
            request_id=request.request_id,
            deadline_unix_ms=request.deadline_unix_ms,
            emit=stream.emit if stream is not None else None,
        )
        result = await self._bounded(
            request, self._run_with_retries(engine, request, opened.payload, ctx, stream)
        )
        try:
            reply, record = self._answers.result(
                request,
                model_digest=engine.model_digest,
                input_hash=opened.input_hash,
                max_output_tokens=max_output_tokens(opened.payload),
                output=result.output,
                usage=result.usage,
                reply_key=opened.reply_key,
            )
        except ValueError:
            # Canonicalisation refused a value an engine produced: answer, never crash.
            raise PermanentError(
                "the output cannot be canonicalised (RFC 8785)", code=ErrorCode.INTERNAL
            ) from None
        mode = self._modes.get(request.mode)
        if mode is not None:
            mode.signed(request, result, record.envelope)
        return Outcome(reply, record, opened.reply_key, opened.input_hash)

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


def _hashed(
    payload: ChatInput | MLInput, document: Any, reply_key: PublicKey | None
) -> _Opened | _Refusal:
    try:
        return _Opened(payload, input_hash(document), reply_key)
    except ValueError:
        return _Refusal(ErrorCode.BAD_REQUEST, "the payload cannot be canonicalised (RFC 8785)")


class _ChunkCounter:
    """Numbers a request's deltas into signed chunks (sealed for a sealed request), in order."""

    def __init__(
        self, answers: Answers, request_id: str, sink: ChunkSink, reply_key: PublicKey | None
    ) -> None:
        self._answers = answers
        self._request_id = request_id
        self._sink = sink
        self._reply_key = reply_key
        self.sent = 0

    async def emit(self, delta: Delta) -> None:
        if not delta.text and not delta.tool_calls:
            return
        chunk = self._answers.chunk(
            self._request_id, self.sent, delta.text, list(delta.tool_calls), self._reply_key
        )
        self.sent += 1
        await self._sink(chunk)
