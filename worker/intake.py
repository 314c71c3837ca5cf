"""Consumption with an in-flight window per partition and ordered commits.

Why not faststream's subscriber: its ``max_workers`` gives concurrency across partitions only
(or commits before processing). Here each partition keeps up to ``window`` requests in flight,
they finish in any order (so a batching engine sees many at once), and the committed offset of
a partition only ever advances over a contiguous run of answered offsets. A crash therefore
re-delivers at most the window, never skips a request.

The window bounds how many requests of a partition *execute* at once. A request whose reply
is waiting for the broker's acknowledgement has left the window (so produce latency does not
idle the engine) but is still tracked, and its offset is not committable until acknowledged.

Bounded memory: a partition is paused once it tracks two windows' worth of requests (one
executing, one awaiting acks), every partition is paused when the process reaches
``max_in_flight``, and ``getmany`` never asks for more records than that cap has room for.

Lifecycle: ``run()`` until ``stop()``; then fetching stops, in-flight work drains within
``drain_timeout_s``, finished offsets are committed, and the consumer leaves the group.

Observability (optional, see ``worker.metrics`` and ``worker.tracing``): each request is counted
once by outcome when its answer is acknowledged, with its queue wait, pipeline and end-to-end
times; per-partition in-flight counts, pauses and consumer lag are sampled every
``metrics_interval_s``. Each request runs in a trace (the request's ``traceparent``, or a new
one) whose ids are bound to every log line written on its behalf and travel on its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition  # type: ignore[import-untyped]
from aiokafka.errors import CommitFailedError, KafkaError  # type: ignore[import-untyped]

from infra.health import consumer_lag
from schemas.codec import Decoded, decode
from schemas.requests import InferenceRequest
from schemas.results import ErrorCode, ErrorReply, StreamChunk
from schemas.topics import HEADER_ATTEMPTS, Topics
from worker.logs import bind_log_context
from worker.metrics import WorkerMetrics
from worker.pipeline import Outcome, Pipeline
from worker.publish import Publisher
from worker.tracing import RequestTrace, Tracer

__all__ = ["Intake", "IntakeConfig"]

log = logging.getLogger(__name__)

_FINAL_COMMIT_ATTEMPTS = 3
_FINAL_COMMIT_BACKOFF_S = 0.2


@dataclass(frozen=True)
class IntakeConfig:
    window_per_partition: int = 64
    max_in_flight: int = 256
    commit_interval_s: float = 0.1
    drain_timeout_s: float = 20.0
    revoke_timeout_s: float = 10.0
    dedupe_window: int = 10_000
    metrics_interval_s: float = 1.0
    """How often per-partition gauges (in flight, paused, lag) are sampled (with metrics)."""


@dataclass
class _Partition:
    """In-flight bookkeeping of one assigned partition."""

    window: asyncio.Semaphore
    order: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    committable: int | None = None
    committed: int | None = None
    paused: bool = False

    def complete(self, offset: int) -> None:
        self.done.add(offset)
        while self.order and self.order[0] in self.done:
            head = self.order.popleft()
            self.done.discard(head)
            self.committable = head + 1


@dataclass(frozen=True)
class _Reply:
    outcome: Outcome
    reply_to: str | None
    remember_id: str | None = None
    """Request id to remember for duplicate suppression once the reply is acknowledged."""


@dataclass(frozen=True)
class _DeadLetter:
    reason: str


@dataclass
class _Job:
    """What is known about one record while it is handled: labels for metrics and spans."""

    model: str
    """The model of the topic it arrived on (bounded: topics this worker subscribes to)."""
    trace: RequestTrace
    mode: str = "unknown"


def _outcome(action: _Reply | _DeadLetter | None) -> str:
    if action is None:
        return "duplicate"
    if isinstance(action, _DeadLetter):
        return "dead_letter"
    reply = action.outcome.reply
    return reply.code.value if isinstance(reply, ErrorReply) else "result"


def _since_s(timestamp_ms: int) -> float | None:
    """Seconds since a record timestamp (None when the record has none)."""
    return time.time() - timestamp_ms / 1000 if timestamp_ms > 0 else None


def _attempts(headers: list[tuple[str, bytes]]) -> int:
    """Earlier attempts recorded by a DLQ replay (``og-attempts``), 0 for a fresh message."""
    for key, value in headers:
        if key == HEADER_ATTEMPTS:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


class Intake:
    def __init__(
        self,
        consumer: Any,
        publisher: Publisher,
        pipeline: Pipeline,
        topics: Topics,
        config: IntakeConfig,
        *,
        metrics: WorkerMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._consumer = consumer
        self._publisher = publisher
        self._pipeline = pipeline
        self._topics = topics
        self._config = config
        self._parts: dict[TopicPartition, _Partition] = {}
        self._in_flight = 0
        self._progress = asyncio.Event()
        self._stopping = asyncio.Event()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._active_ids: set[str] = set()
        self.max_concurrency_seen = 0
        self.fatal: BaseException | None = None
        """Set when the worker must exit non-zero (a publish failed): let the orchestrator
        restart it, and the uncommitted request be redelivered."""
        self._running = 0
        self._metrics = metrics
        self._tracer = tracer if tracer is not None else Tracer()
        if metrics is not None:
            metrics.track_intake(
                lambda: self._in_flight,
                lambda: self._running,
                window_per_partition=config.window_per_partition,
                max_in_flight=config.max_in_flight,
            )

    # -- lifecycle ---------------------------------------------------------------------------

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        intake = self

        class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                await intake._on_revoked(set(revoked))

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                intake._on_assigned(set(assigned))

        return _Listener()

    def stop(self) -> None:
        """Ask ``run`` to stop fetching and drain; safe to call from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        committer = asyncio.create_task(self._commit_loop())
        sampler = asyncio.create_task(self._metrics_loop()) if self._metrics else None
        try:
            while not self._stopping.is_set():
                self._progress.clear()
                self._apply_backpressure()
                fetch_timeout_ms = 100
                if self._parts and all(p.paused for p in self._parts.values()):
                    # Nothing can be fetched: wake as soon as a request finishes rather than
                    # idling in getmany, then poll without waiting (keeps max_poll_interval).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._progress.wait(), 0.1)
                    self._apply_backpressure()
                    fetch_timeout_ms = 0
                room = self._config.max_in_flight - self._in_flight
                batches = await self._consumer.getmany(
                    timeout_ms=fetch_timeout_ms, max_records=max(room, 1)
                )
                for tp, records in batches.items():
                    for record in records:
                        self._admit(tp, record)
        finally:
            await self._drain()
            for task in (committer, sampler):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._commit(list(self._parts), attempts=_FINAL_COMMIT_ATTEMPTS)

    # -- window ------------------------------------------------------------------------------

    def _admit(self, tp: TopicPartition, record: Any) -> None:
        part = self._parts.get(tp)
        if part is None:  # a record fetched just before its partition was revoked
            return
        part.order.append(record.offset)
        self._in_flight += 1
        task = asyncio.create_task(self._process(tp, part, record))
        part.tasks[record.offset] = task

    def _apply_backpressure(self) -> None:
        global_full = self._in_flight >= self._config.max_in_flight
        for tp, part in self._parts.items():
            # Up to a window executing plus a window awaiting broker acks.
            full = global_full or len(part.tasks) >= 2 * self._config.window_per_partition
            if full and not part.paused:
                self._consumer.pause(tp)
                part.paused = True
            elif not full and part.paused:
                self._consumer.resume(tp)
                part.paused = False

    async def _process(self, tp: TopicPartition, part: _Partition, record: Any) -> None:
        job = self._begin(tp, record)
        # Replies, settlement records and dead letters carry the traceparent of our span.
        headers = job.trace.headers
        action: _Reply | _DeadLetter | None = None
        error: BaseException | None = None
        try:
            # The window bounds execution; publishing (waiting for broker acks) happens after
            # the slot is released, so produce latency does not idle the engine. The request
            # still counts towards the partition's pause threshold until it is acknowledged.
            async with part.window:
                self._running += 1
                self.max_concurrency_seen = max(self.max_concurrency_seen, self._running)
                if self._metrics is not None:
                    waited_s = _since_s(record.timestamp)
                    if waited_s is not None:
                        self._metrics.request_started(job.model, waited_s)
                try:
                    action = await self._decide(tp, record, headers, job)
                finally:
                    self._running -= 1
            if action is not None:
                with job.trace.span("og.publish", kind="PRODUCER"):
                    await self._deliver(tp, record, headers, action)
        except asyncio.CancelledError as e:
            # Abandoned on revocation or shutdown: not marked done, so never committed; the
            # next owner of the partition answers it.
            error = e
            if self._metrics is not None:
                self._metrics.request_abandoned(job.model)
            raise
        except Exception as e:
            # Publishing failed after retries inside the producer. Leave the offset uncommitted
            # and stop: a restart redelivers it rather than this worker silently skipping it.
            error = e
            log.critical(
                "publish failed; stopping for redelivery", extra={"error": type(e).__name__}
            )
            if self._metrics is not None:
                self._metrics.publish_failed()
            self.fatal = e
            self.stop()
        else:
            part.complete(record.offset)
            if self._pipeline.fatal is not None and self.fatal is None:
                # The engine is gone (answered, not committed past): exit for a restart.
                log.critical("engine failed fatally; stopping")
                self.fatal = self._pipeline.fatal
                self.stop()
            outcome = _outcome(action)
            if self._metrics is not None:
                e2e_s = _since_s(record.timestamp) if action is not None else None
                self._metrics.request_finished(job.model, job.mode, outcome, e2e_s)
            job.trace.set(**{"og.outcome": outcome})
        finally:
            if isinstance(action, _Reply) and action.remember_id is not None:
                self._active_ids.discard(action.remember_id)
            part.tasks.pop(record.offset, None)
            self._in_flight -= 1
            self._progress.set()
            job.trace.end(error)

    def _begin(self, tp: TopicPartition, record: Any) -> _Job:
        """Start the record's trace and bind its ids to this task's log lines."""
        model = self._topics.model_of(tp.topic) or "unknown"
        attributes = None
        if self._tracer.recording:
            attributes = {
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": tp.topic,
                "messaging.destination.partition.id": str(tp.partition),
                "messaging.kafka.offset": record.offset,
                "og.model": model,
            }
        trace = self._tracer.begin(list(record.headers or ()), attributes=attributes)
        bind_log_context(trace_id=trace.context.trace_id, span_id=trace.context.span_id)
        return _Job(model, trace)

    async def _decide(
        self, tp: TopicPartition, record: Any, headers: list[tuple[str, bytes]], job: _Job
    ) -> _Reply | _DeadLetter | None:
        """What to publish for one record (None: a duplicate, nothing to publish)."""
        decoded = decode(record.value, InferenceRequest)
        if not isinstance(decoded, Decoded):
            if decoded.request_id is None:
                return _DeadLetter(decoded.reason)
            bind_log_context(request_id=decoded.request_id)
            reply = self._pipeline.error(
                decoded.request_id,
                self._topics.model_of(tp.topic) or "",
                ErrorCode.BAD_REQUEST,
                decoded.reason,
            )
            return _Reply(Outcome(reply), self._allowed_reply_topic(decoded.reply_to))
        request = decoded.message
        job.mode = request.mode.value
        bind_log_context(request_id=request.request_id)
        job.trace.set(**{"og.request_id": request.request_id, "og.mode": job.mode})
        if request.request_id in self._recent or request.request_id in self._active_ids:
            # Answered already, or being answered now. If that answer fails to publish, the
            # worker stops before committing past it, so this copy is redelivered: safe.
            log.info("duplicate request dropped", extra={"request_id": request.request_id})
            return None
        # Held until the answer is acknowledged (released in ``_process``), or released now if
        # answering is abandoned, so a later redelivery is not mistaken for a duplicate.
        self._active_ids.add(request.request_id)
        try:
            return await self._answer(tp, request, decoded.document["payload"], headers, job)
        except BaseException:
            self._active_ids.discard(request.request_id)
            raise

    async def _answer(
        self,
        tp: TopicPartition,
        request: InferenceRequest,
        payload: Any,
        headers: list[tuple[str, bytes]],
        job: _Job,
    ) -> _Reply:
        reply_to = self._allowed_reply_topic(request.reply_to)
        topic_model = self._topics.model_of(tp.topic)
        if reply_to != request.reply_to:
            error = (ErrorCode.BAD_REQUEST, "reply_to names an internal topic")
        elif topic_model is not None and topic_model != request.model:
            error = (
                ErrorCode.UNKNOWN_MODEL,
                f"request for another model arrived on the topic of {topic_model}",
            )
        else:
            outcome = await self._run_pipeline(request, payload, reply_to, headers, job)
            return _Reply(outcome, reply_to, request.request_id)
        reply = self._pipeline.error(request.request_id, request.model, *error)
        return _Reply(Outcome(reply), reply_to, request.request_id)

    def _allowed_reply_topic(self, reply_to: str | None) -> str | None:
        """The requested reply topic, or None (the shared one) when it names an internal
        topic: a client must not make a worker write into settlement or the registry."""
        if reply_to is not None and self._topics.is_internal(reply_to):
            return None
        return reply_to

    async def _deliver(
        self,
        tp: TopicPartition,
        record: Any,
        headers: list[tuple[str, bytes]],
        action: _Reply | _DeadLetter | None,
    ) -> None:
        if isinstance(action, _Reply):
            await self._publisher.publish_outcome(action.outcome, action.reply_to, headers)
            if action.remember_id is not None:
                self._remember(action.remember_id)
        elif isinstance(action, _DeadLetter):
            await self._publisher.dead_letter(
                record.value,
                action.reason,
                topic=tp.topic,
                partition=tp.partition,
                offset=record.offset,
                attempts=_attempts(headers) + 1,
                request_headers=headers,
            )

    async def _run_pipeline(
        self,
        request: InferenceRequest,
        payload: Any,
        reply_to: str | None,
        headers: list[tuple[str, bytes]],
        job: _Job,
    ) -> Outcome:
        async def chunks(chunk: StreamChunk) -> None:
            await self._publisher.publish_chunk(chunk, reply_to, headers)

        started = time.perf_counter()
        try:
            with job.trace.span("og.infer"):
                return await self._pipeline.handle(
                    request, payload, chunks=chunks if request.stream else None
                )
        except Exception as e:
            # A bug in our own code must still end in an answer, not a stalled partition. No
            # traceback in the log: exception texts can echo request data.
            log.error(
                "pipeline failure",
                extra={"request_id": request.request_id, "error_type": type(e).__name__},
            )
            return Outcome(
                self._pipeline.error(
                    request.request_id,
                    request.model,
                    ErrorCode.INTERNAL,
                    f"internal error ({type(e).__name__})",
                    retryable=True,
                )
            )
        finally:
            if self._metrics is not None:
                self._metrics.inference_done(job.model, time.perf_counter() - started)

    def _remember(self, request_id: str) -> None:
        if self._config.dedupe_window == 0:
            return
        self._recent[request_id] = None
        if len(self._recent) > self._config.dedupe_window:
            self._recent.popitem(last=False)

    # -- commits and rebalances --------------------------------------------------------------

    async def _metrics_loop(self) -> None:
        assert self._metrics is not None
        while True:
            await asyncio.sleep(self._config.metrics_interval_s)
            tps = list(self._parts)
            try:
                lags = await consumer_lag(self._consumer, tps)
            except Exception as e:  # sampling must never take the intake down
                log.warning("consumer lag not sampled", extra={"error": type(e).__name__})
                lags = {}
            for tp in tps:
                part = self._parts.get(tp)
                if part is not None:
                    self._metrics.set_partition(
                        tp.topic,
                        tp.partition,
                        in_flight=len(part.tasks),
                        paused=part.paused,
                        lag=lags.get(tp),
                    )

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.commit_interval_s)
            await self._commit(list(self._parts))

    async def _commit(self, tps: list[TopicPartition], *, attempts: int = 1) -> bool:
        """Commit the contiguous answered prefix of ``tps``; True when nothing is left.

        Periodic commits try once (the next tick retries). The last commits before the
        partitions go away (shutdown, revocation) try ``attempts`` times: an offset left
        uncommitted there means its requests are answered again by the next owner.
        """
        for attempt in range(attempts):
            offsets = {}
            for tp in tps:
                part = self._parts.get(tp)
                if part and part.committable is not None and part.committable != part.committed:
                    offsets[tp] = part.committable
            if not offsets:
                return True
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as e:
                log.warning(
                    "commit failed", extra={"error": type(e).__name__, "attempt": attempt + 1}
                )
                if attempt + 1 < attempts:
                    await asyncio.sleep(_FINAL_COMMIT_BACKOFF_S * (attempt + 1))
                continue
            for tp, offset in offsets.items():
                if tp in self._parts:
                    self._parts[tp].committed = offset
            return True
        return False

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._parts[tp] = _Partition(
                window=asyncio.Semaphore(self._config.window_per_partition)
            )
        log.info("partitions assigned", extra={"partitions": sorted(str(tp) for tp in assigned)})

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        tasks = [
            task for tp in revoked if tp in self._parts for task in self._parts[tp].tasks.values()
        ]
        await self._finish(tasks, self._config.revoke_timeout_s)
        await self._commit(
            [tp for tp in revoked if tp in self._parts], attempts=_FINAL_COMMIT_ATTEMPTS
        )
        for tp in revoked:
            self._parts.pop(tp, None)
            if self._metrics is not None:
                self._metrics.forget_partition(tp.topic, tp.partition)

    async def _drain(self) -> None:
        tasks = [task for part in self._parts.values() for task in part.tasks.values()]
        await self._finish(tasks, self._config.drain_timeout_s)

    @staticmethod
    async def _finish(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
