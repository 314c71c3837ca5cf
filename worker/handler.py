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

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from infra.kafka.ports import Headers, Record, UnreadableRecord
from infra.logs import bind_log_context
from schemas.codec import Decoded, decode
from schemas.requests import InferenceRequest
from schemas.results import ErrorCode, ErrorReply, StreamChunk
from schemas.topics import HEADER_ATTEMPTS, Topics
from worker.pipeline import ChunkSink, Outcome, Pipeline

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

_MAX_ATTEMPTS_HEADER = 1_000_000


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
ChunkPublisher = Callable[[StreamChunk, str | None, Headers], Awaitable[None]]
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
    ) -> None:
        self._pipeline = pipeline
        self._publish_chunk = publish_chunk
        self._topics = topics
        self._dedupe_window = dedupe_window
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._active: set[str] = set()

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
                reply = self._pipeline.error(
                    request_id, topic_model, ErrorCode.BAD_REQUEST, decoded.reason
                )
                return Reply(Outcome(reply), self.allowed_reply_topic(decoded.reply_to))
            request = decoded.message
            request_id = request.request_id
            bind_log_context(request_id=request_id)
            if request_id in self._recent or request_id in self._active:
                # Answered already, or being answered now. If that answer fails to publish,
                # the offset is not committed past it, so this copy is redelivered: safe.
                log.info("duplicate request dropped", extra={"request_id": request_id})
                return Duplicate(request_id, request.mode.value)
            # Held until the answer is acknowledged (``answered``) or abandoned (``release``).
            self._active.add(request_id)
            try:
                return await self._answer(request, decoded.document["payload"], record, headers)
            except BaseException:
                self._active.discard(request_id)
                raise
        except Exception as e:
            # Our own bug: answer it (typed, no exception text: it may echo request data).
            log.error("record handling failed", extra={"error_type": type(e).__name__})
            if request_id is None:
                return DeadLetter(f"internal error while handling ({type(e).__name__})")
            self._active.discard(request_id)
            reply = self._pipeline.error(
                request_id,
                self._topics.model_of(record.topic) or "",
                ErrorCode.INTERNAL,
                "internal error",
                retryable=True,
            )
            return Reply(Outcome(reply), None)

    async def _answer(
        self, request: InferenceRequest, payload: Any, record: Record, headers: Headers
    ) -> Reply:
        reply_to = self.allowed_reply_topic(request.reply_to)
        topic_model = self._topics.model_of(record.topic)
        error: tuple[ErrorCode, str] | None = None
        if reply_to != request.reply_to:
            error = (ErrorCode.BAD_REQUEST, "reply_to names an internal topic")
        elif topic_model is not None and topic_model != request.model:
            error = (ErrorCode.UNKNOWN_MODEL, "request for another model on this model's topic")
        if error is not None:
            reply: ErrorReply = self._pipeline.error(request.request_id, request.model, *error)
            return Reply(Outcome(reply), reply_to, request.request_id, request.mode.value)
        chunks: ChunkSink | None = None
        if request.stream:

            async def chunks(chunk: StreamChunk) -> None:
                await self._publish_chunk(chunk, reply_to, headers)

        started = time.perf_counter()
        outcome = await self._pipeline.handle(request, payload, chunks=chunks)
        elapsed_s = time.perf_counter() - started
        return Reply(outcome, reply_to, request.request_id, request.mode.value, elapsed_s)

    @property
    def fatal(self) -> BaseException | None:
        """Set once an engine reported a fatal failure (the worker must stop)."""
        return self._pipeline.fatal

    def error_for(self, request_id: str, model: str, code: ErrorCode, message: str) -> ErrorReply:
        """A typed error reply for ``request_id`` (used when an answer cannot be delivered)."""
        return self._pipeline.error(request_id, model, code, message)

    def allowed_reply_topic(self, reply_to: str | None) -> str | None:
        """The requested reply topic, or None (the shared one) when it names an internal
        topic: a client must not make a worker write into settlement or the registry."""
        if reply_to is not None and self._topics.is_internal(reply_to):
            return None
        return reply_to

    def answered(self, request_id: str) -> None:
        """The answer to ``request_id`` is acknowledged: later copies are duplicates."""
        self._active.discard(request_id)
        if self._dedupe_window == 0:
            return
        self._recent[request_id] = None
        if len(self._recent) > self._dedupe_window:
            self._recent.popitem(last=False)

    def release(self, request_id: str) -> None:
        """Answering ``request_id`` was abandoned (revocation, shutdown): a redelivery of it
        must be answered, not dropped as a duplicate."""
        self._active.discard(request_id)
