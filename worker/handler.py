"""Per-record handling: what to publish for one consumed record. No Kafka import.

``RecordHandler.handle`` maps a record to an ``Action``:

- ``Reply``: a signed result or a typed error for the request's reply topic (plus, for a
  result, the settlement record);
- ``DeadLetter``: the record cannot be answered (no readable request id): it goes to the DLQ
  with a reason;
- ``Duplicate``: the same request id was answered (or is being answered) already: nothing.

It never raises for anything a record can contain: a bug in our own code while handling one
record still ends in a typed ``internal`` answer or a dead letter, never in an exception that
could stop the intake (and, on restart, stop it again on the same record).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nacl.public import PublicKey

from infra.kafka.ports import Headers, Record, UnreadableRecord
from infra.logs import bind_log_context
from schemas.codec import Decoded, decode
from schemas.requests import InferenceRequest
from schemas.results import ErrorCode, ErrorReply, SealedReply, StreamChunk
from schemas.sealed import SealedInput
from schemas.topics import HEADER_ATTEMPTS, Topics
from worker.pipeline import ChunkSink, Outcome, Pipeline
from worker.replies import ReplyTopics

__all__ = [
    "Action",
    "ChunkPublisher",
    "DeadLetter",
    "Duplicate",
    "RecordHandler",
    "Reply",
    "attempts",
]

log = logging.getLogger(__name__)

_MAX_ATTEMPTS_HEADER = 999_999
"""One below ``DlqEntry.attempts``' bound (1,000,000): a dead letter counts one more attempt, and
an entry over the bound would fail to build, stopping the worker on every redelivery."""


@dataclass(frozen=True, slots=True)
class Reply:
    outcome: Outcome
    reply_to: str | None
    """None: the namespace's shared replies topic."""
    request_id: str | None = None
    """Remembered for duplicate suppression once the reply is acknowledged."""
    mode: str = "unknown"
    """The verification mode asked for (a metrics label)."""
    pipeline_s: float | None = None
    """How long the pipeline ran (None: answered without running it)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    """Safe to log and to publish: names fields and error kinds, never values."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    request_id: str
    mode: str = "unknown"


Action = Reply | DeadLetter | Duplicate
ChunkPublisher = Callable[[StreamChunk | SealedReply, str | None, Headers], Awaitable[None]]
"""Publishes one stream chunk to a reply topic (``Publisher.publish_chunk``)."""


def attempts(headers: Headers) -> int:
    """Earlier attempts recorded by a DLQ replay (``og-attempts``), 0 for a fresh message.
    Header values are attacker-controlled: null, non-ASCII or huge values count as 0."""
    for key, value in headers:
        if key != HEADER_ATTEMPTS or value is None or len(value) > 7:
            continue
        text = value.decode("ascii", "replace")
        if text.isdigit():
            return min(int(text), _MAX_ATTEMPTS_HEADER)
    return 0


class RecordHandler:
    def __init__(
        self,
        pipeline: Pipeline,
        topics: Topics,
        publish_chunk: ChunkPublisher,
        *,
        dedupe_window: int,
        reply_topics: ReplyTopics | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._publish_chunk = publish_chunk
        self._topics = topics
        self._dedupe_window = dedupe_window
        self._reply_topics = reply_topics or ReplyTopics(topics)
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._active: dict[str, bytes] = {}
        """Request id -> sha256 of the message that carries it (answered, or being answered):
        the same bytes again are a redelivery; other bytes under the same id, a duplicate."""

    async def handle(self, record: Record, headers: Headers) -> Action:
        """The action for one record (see the module docstring). ``headers`` travel with
        every message published for it (the trace context)."""
        request_id: str | None = None
        if isinstance(record, UnreadableRecord):
            return DeadLetter(record.reason)
        try:
            decoded = decode(record.value, InferenceRequest)
            topic_model = self._topics.model_of(record.topic) or ""
            if not isinstance(decoded, Decoded):
                if decoded.request_id is None:
                    return DeadLetter(decoded.reason)
                request_id = decoded.request_id
                bind_log_context(request_id=request_id)
                reply_to = decoded.reply_to
                if await self._reply_topics.refusal(reply_to) is not None:
                    reply_to = None
                reply = self._pipeline.error(
                    request_id, topic_model, ErrorCode.BAD_REQUEST, decoded.reason
                )
                return Reply(Outcome(reply, error_code=ErrorCode.BAD_REQUEST), reply_to)
            request = decoded.message
            request_id = request.request_id
            bind_log_context(request_id=request_id)
            fingerprint = hashlib.sha256(record.value or b"").digest()
            seen = self._recent.get(request_id) or self._active.get(request_id)
            if seen == fingerprint:
                # Answered already, or being answered now. If that answer fails to publish,
                # the offset is not committed past it, so this copy is redelivered: safe.
                log.info("duplicate request dropped", extra={"request_id": request_id})
                return Duplicate(request_id, request.mode.value)
            if seen is not None:
                return await self._refuse(
                    request,
                    record,
                    ErrorCode.DUPLICATE_REQUEST,
                    "another request with this id was answered by this node",
                )
            # Held until the answer is acknowledged (``answered``) or abandoned (``release``).
            self._active[request_id] = fingerprint
            try:
                return await self._answer(request, decoded.document["payload"], record, headers)
            except BaseException:
                self._active.pop(request_id, None)
                raise
        except Exception as e:
            # Our own bug: answer it (typed, no exception text: it may echo request data).
            log.error("record handling failed", extra={"error_type": type(e).__name__})
            if request_id is None:
                return DeadLetter(f"internal error while handling ({type(e).__name__})")
            self._active.pop(request_id, None)
            reply = self._pipeline.error(
                request_id,
                self._topics.model_of(record.topic) or "",
                ErrorCode.INTERNAL,
                "internal error",
                retryable=True,
            )
            return Reply(Outcome(reply, error_code=ErrorCode.INTERNAL), None)

    async def _refuse(
        self, request: InferenceRequest, record: Record, code: ErrorCode, message: str
    ) -> Reply:
        """A typed error for a request that is not run (sealed to the request's reply key when
        it is sealed), on its reply topic if allowed, else on the shared one."""
        reply_to = request.reply_to
        if await self._reply_topics.refusal(reply_to) is not None:
            reply_to = None
        reply_key = (
            PublicKey(bytes.fromhex(request.payload.reply_public_key))
            if isinstance(request.payload, SealedInput)
            else None
        )
        reply = self._pipeline.error(
            request.request_id, request.model, code, message, reply_key=reply_key
        )
        outcome = Outcome(reply, reply_key=reply_key, error_code=code)
        return Reply(outcome, reply_to, None, request.mode.value)

    async def _answer(
        self, request: InferenceRequest, payload: Any, record: Record, headers: Headers
    ) -> Reply:
        refusal = await self._reply_topics.refusal(request.reply_to)
        topic_model = self._topics.model_of(record.topic)
        if refusal is not None:
            self._active.pop(request.request_id, None)
            return await self._refuse(request, record, ErrorCode.REPLY_TOPIC_REFUSED, refusal)
        if topic_model is not None and topic_model != request.model:
            self._active.pop(request.request_id, None)
            message = "request for another model on this model's topic"
            return await self._refuse(request, record, ErrorCode.UNKNOWN_MODEL, message)
        reply_to = request.reply_to
        chunks: ChunkSink | None = None
        if request.stream:

            async def chunks(chunk: StreamChunk | SealedReply) -> None:
                await self._publish_chunk(chunk, reply_to, headers)

        started = time.perf_counter()
        outcome = await self._pipeline.handle(request, payload, chunks=chunks)
        elapsed_s = time.perf_counter() - started
        return Reply(outcome, reply_to, request.request_id, request.mode.value, elapsed_s)

    @property
    def fatal(self) -> BaseException | None:
        """Set once an engine reported a fatal failure (the worker must stop)."""
        return self._pipeline.fatal

    def error_for(
        self, outcome: Outcome, model: str, code: ErrorCode, message: str
    ) -> ErrorReply | SealedReply:
        """A typed error replacing ``outcome``'s reply (used when an answer cannot be
        delivered): signed, naming its input hash, sealed like the answer it replaces."""
        return self._pipeline.error(
            outcome.reply.request_id,
            model,
            code,
            message,
            input_hash=outcome.input_hash,
            reply_key=outcome.reply_key,
        )

    def answered(self, request_id: str) -> None:
        """The answer to ``request_id`` is acknowledged: later copies are duplicates."""
        fingerprint = self._active.pop(request_id, None)
        if self._dedupe_window == 0 or fingerprint is None:
            return
        self._recent[request_id] = fingerprint
        if len(self._recent) > self._dedupe_window:
            self._recent.popitem(last=False)

    def release(self, request_id: str) -> None:
        """Answering ``request_id`` was abandoned (revocation, shutdown): a redelivery of it
        must be answered, not dropped as a duplicate."""
        self._active.pop(request_id, None)
