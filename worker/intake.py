"""Consumption with an in-flight window per partition and ordered commits.

Why not faststream's subscriber: its ``max_workers`` gives concurrency across partitions only
(or commits before processing). Here each partition keeps up to ``window_per_partition``
requests in flight, they finish in any order (so a batching engine sees many at once), and the
committed offset of a partition only ever advances over a contiguous run of answered offsets.

The window bounds *uncommitted* offsets: a partition is paused while the span from its oldest
unanswered offset to its newest admitted one is a full window, and records fetched beyond the
window are handed back (the consumer seeks to the first of them), so a crash redelivers at
most the window. A request stuck at the head is bounded by its deadline (the pipeline answers
``deadline_exceeded`` or ``timeout``), so the partition always moves on. Every partition is
paused when the process holds ``max_in_flight`` requests, and ``getmany`` never asks for more.

Per-record failures are never fatal: ``RecordHandler`` turns any record into an answer or a
dead letter, and delivery problems that concern one record (its reply is too large, its reply
topic does not exist) become a typed error or a dead letter. Only a broker that keeps failing
past ``publish_attempts`` stops the worker, and only after dead-lettering the record failed
too: if the DLQ accepts it, the broker works and the record was the problem, so it is
dead-lettered and committed, and a restart never stops again on it.

Lifecycle: ``run()`` until ``stop()``; then fetching stops, in-flight work drains within
``drain_timeout_s``, finished offsets are committed, and the consumer leaves the group. The
commit loop and the metrics sampler are supervised: if one dies, the intake stops (non-zero).

Shutdown is bounded whatever the cluster does: ``stop()`` abandons a fetch in progress, every
commit is bounded by ``commit_timeout_s`` and the final ones together by the same, so ``run()``
returns within ``drain_timeout_s + max(1, drain_timeout_s / 4) + commit_timeout_s`` (plus 5 s
if a helper task ignores cancellation). Cancelling ``run()`` goes through the same steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.kafka.ports import (
    CommitFailed,
    Consumer,
    KafkaPortError,
    MessageTooLarge,
    RebalanceListener,
    Record,
    TopicPartition,
    UnknownTopic,
)
from infra.lifecycle import Supervisor
from schemas.results import ErrorCode
from worker.handler import Action, DeadLetter, Duplicate, RecordHandler, Reply, attempts
from worker.metrics import WorkerMetrics
from worker.observe import Job, RecordObserver
from worker.pipeline import Outcome
from worker.publish import Publisher

__all__ = ["DeliveryFailed", "Intake", "IntakeConfig"]

log = logging.getLogger(__name__)

_FINAL_COMMIT_ATTEMPTS = 3
_FINAL_COMMIT_BACKOFF_S = 0.2
_FETCH_FAILURES_FATAL = 20


@dataclass(frozen=True)
class IntakeConfig:
    window_per_partition: int = 64
    """Uncommitted offsets a partition may hold (executing or awaiting broker acks)."""
    max_in_flight: int = 256
    commit_interval_s: float = 0.1
    drain_timeout_s: float = 20.0
    revoke_timeout_s: float = 10.0
    metrics_interval_s: float = 1.0
    """How often per-partition gauges (in flight, paused, lag) are sampled (with metrics)."""
    publish_attempts: int = 5
    """Tries to publish one answer while the broker fails, before the worker gives up."""
    publish_backoff_s: float = 0.5
    commit_timeout_s: float = 5.0
    """How long one offset commit may take before it counts as failed (a hanging commit must
    not hold the commit loop, a revocation or shutdown); the final commits get this in all."""


class DeliveryFailed(Exception):
    """The broker refused an answer and its dead letter past the retry budget."""


@dataclass
class _Partition:
    """In-flight bookkeeping of one assigned partition."""

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


class _Listener(RebalanceListener):
    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._intake._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._intake._on_assigned(assigned)


class Intake:
    def __init__(
        self,
        consumer: Consumer,
        publisher: Publisher,
        handler: RecordHandler,
        observer: RecordObserver,
        config: IntakeConfig,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._consumer = consumer
        self._publisher = publisher
        self._handler = handler
        self._observer = observer
        self._config = config
        self._metrics = metrics
        self._parts: dict[TopicPartition, _Partition] = {}
        self._in_flight = 0
        self._running = 0
        self._progress = asyncio.Event()
        self._stopping = asyncio.Event()
        self._supervisor = Supervisor(on_failure=lambda _name: self.stop())
        self.max_concurrency_seen = 0
        self.fatal: BaseException | None = None
        """Set when the worker must exit non-zero (the broker failed past the retry budget, a
        supervised task died, or the engine died): a restart redelivers what is uncommitted."""
        if metrics is not None:
            metrics.track_intake(
                lambda: self._in_flight,
                lambda: self._running,
                window_per_partition=config.window_per_partition,
                max_in_flight=config.max_in_flight,
            )

    # -- lifecycle ---------------------------------------------------------------------------

    def rebalance_listener(self) -> RebalanceListener:
        return _Listener(self)

    @property
    def healthy(self) -> bool:
        """False once a supervised helper task died (readiness)."""
        return self._supervisor.healthy

    def stop(self) -> None:
        """Ask ``run`` to stop fetching and drain; safe to call from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        self._supervisor.spawn("intake-commit", self._commit_loop())
        if self._metrics is not None:
            self._supervisor.spawn("intake-metrics", self._metrics_loop())
        try:
            await self._fetch_loop()
        except Exception as e:  # an error no port promises (a bug): stop cleanly, non-zero
            log.critical("fetching failed; stopping", extra={"error_type": type(e).__name__})
            if self.fatal is None:
                self.fatal = e
        finally:
            await self._finish(self._all_tasks(), self._config.drain_timeout_s)
            await self._supervisor.stop()
            if self._supervisor.failures and self.fatal is None:
                self.fatal = RuntimeError(f"task died: {sorted(self._supervisor.failures)}")
            await self._final_commit(list(self._parts))

    async def _fetch_loop(self) -> None:
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await self._fetch_until(stopped)
        finally:
            stopped.cancel()

    async def _fetch_until(self, stopped: asyncio.Future[Any]) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._progress.clear()
            self._apply_backpressure()
            timeout_ms = 100
            if self._parts and all(p.paused for p in self._parts.values()):
                # Nothing can be fetched: wake as soon as a request finishes rather than
                # idling in getmany, then poll without waiting (keeps max_poll_interval).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._progress.wait()
                self._apply_backpressure()
                timeout_ms = 0
            room = self._config.max_in_flight - self._in_flight
            try:
                batches = await self._fetch(stopped, timeout_ms, max(room, 1))
            except KafkaPortError as e:
                failures += 1
                log.warning("fetch failed", extra={"error_type": type(e).__name__})
                if failures >= _FETCH_FAILURES_FATAL:
                    self.fatal = e
                    return
                await asyncio.wait((stopped,), timeout=min(0.1 * failures, 2.0))
                continue
            failures = 0
            if batches is None or self._stopping.is_set():
                break  # fetched after stop(): left uncommitted, the next owner answers them
            for tp, records in batches.items():
                self._admit(tp, records)

    async def _fetch(
        self, stopped: asyncio.Future[Any], timeout_ms: int, max_records: int
    ) -> Mapping[TopicPartition, Sequence[Record]] | None:
        """``getmany``, abandoned (None) once ``stop()`` is called: a fetch that hangs (a
        rebalance that never completes, a client bug) must not hold shutdown."""
        fetch = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        )
        try:
            await asyncio.wait((fetch, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not fetch.done():
                fetch.cancel()
                fetch.add_done_callback(_retrieve)
        return fetch.result() if fetch.done() and not fetch.cancelled() else None

    # -- window ------------------------------------------------------------------------------

    def _admit(self, tp: TopicPartition, records: Sequence[Record]) -> None:
        part = self._parts.get(tp)
        if part is None:  # fetched just before its partition was revoked
            return
        room = max(0, self._config.window_per_partition - len(part.order))
        for record in records[:room]:
            part.order.append(record.offset)
            self._in_flight += 1
            part.tasks[record.offset] = asyncio.create_task(self._process(tp, part, record))
        if len(records) > room:
            # Beyond the window: hand them back; they are fetched again once there is room.
            self._consumer.seek(tp, records[room].offset)
            if not part.paused:
                self._consumer.pause(tp)
                part.paused = True

    def _apply_backpressure(self) -> None:
        global_full = self._in_flight >= self._config.max_in_flight
        window = self._config.window_per_partition
        for tp, part in self._parts.items():
            full = global_full or len(part.order) >= window
            if full and not part.paused:
                self._consumer.pause(tp)
                part.paused = True
            elif not full and part.paused:
                self._consumer.resume(tp)
                part.paused = False

    async def _process(self, tp: TopicPartition, part: _Partition, record: Record) -> None:
        job = self._observer.begin(record)
        action: Action | None = None
        error: BaseException | None = None
        try:
            self._running += 1
            self.max_concurrency_seen = max(self.max_concurrency_seen, self._running)
            self._observer.started(job)
            try:
                with job.trace.span("og.infer"):
                    action = await self._handler.handle(record, job.headers)
            finally:
                self._running -= 1
            if isinstance(action, Reply) and action.pipeline_s is not None:
                self._observer.executed(job, action.pipeline_s)
            if not isinstance(action, Duplicate):
                with job.trace.span("og.publish", kind="PRODUCER"):
                    action = await self._deliver(record, job, action)
        except asyncio.CancelledError as e:
            # Abandoned on revocation or shutdown: not marked done, so never committed; the
            # next owner of the partition answers it.
            error = e
            if isinstance(action, Reply) and action.request_id is not None:
                self._handler.release(action.request_id)
            self._observer.abandoned(job)
            raise
        except DeliveryFailed as e:
            # The broker is failing, not this record: leave the offset uncommitted and stop;
            # a restart redelivers it.
            error = e
            log.critical("broker failed past the retry budget; stopping")
            if self._metrics is not None:
                self._metrics.publish_failed()
            if self.fatal is None:
                self.fatal = e
            self.stop()
        else:
            part.complete(record.offset)
            engine_fatal = self._handler.fatal
            if engine_fatal is not None and self.fatal is None:
                # The engine is gone (this request was answered): exit for a restart.
                log.critical("engine failed fatally; stopping")
                self.fatal = engine_fatal
                self.stop()
            self._observer.finished(job, action)
        finally:
            part.tasks.pop(record.offset, None)
            self._in_flight -= 1
            self._progress.set()
            job.trace.end(error)

    # -- delivery ----------------------------------------------------------------------------

    async def _deliver(self, record: Record, job: Job, action: Action) -> Action:
        """Publish ``action``; returns what was finally published (a reply that could not be
        delivered becomes a typed error or a dead letter). ``DeliveryFailed`` only when the
        broker refused past the budget even the dead letter."""
        failures = 0
        while True:
            try:
                await self._publish(record, job, action)
                if isinstance(action, Reply) and action.request_id is not None:
                    self._handler.answered(action.request_id)
                return action
            except MessageTooLarge:
                action = self._too_large(action)
            except UnknownTopic:
                if isinstance(action, DeadLetter):
                    raise DeliveryFailed("the dead-letter topic does not exist") from None
                action = DeadLetter("the reply topic does not exist")
            except KafkaPortError as e:
                failures += 1
                log.warning(
                    "publish failed",
                    extra={"error_type": type(e).__name__, "attempt": failures},
                )
                if failures >= self._config.publish_attempts:
                    if isinstance(action, DeadLetter):
                        raise DeliveryFailed(type(e).__name__) from e
                    action = DeadLetter("the answer could not be published")
                    failures = 0
                    continue
                await asyncio.sleep(self._config.publish_backoff_s * failures)
            except Exception as e:  # a bug of ours while publishing: never a crash loop
                log.error("publishing failed", extra={"error_type": type(e).__name__})
                if isinstance(action, DeadLetter):
                    raise DeliveryFailed(type(e).__name__) from e
                action = DeadLetter(f"internal error while publishing ({type(e).__name__})")

    async def _publish(self, record: Record, job: Job, action: Action) -> None:
        if isinstance(action, Reply):
            await self._publisher.publish_outcome(action.outcome, action.reply_to, job.headers)
        elif isinstance(action, DeadLetter):
            await self._publisher.dead_letter(
                record.value,
                action.reason,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                attempts=attempts(record.headers or ()) + 1,
                request_headers=job.headers,
            )

    def _too_large(self, action: Action) -> Action:
        if isinstance(action, Reply) and action.outcome.record is not None:
            outcome = action.outcome
            code = ErrorCode.OUTPUT_TOO_LARGE
            error = self._handler.error_for(
                outcome,
                action.outcome.record.envelope.model_id,
                code,
                "the output is larger than the largest message this node may publish",
            )
            replaced = Outcome(error, reply_key=outcome.reply_key, error_code=code)
            return Reply(replaced, action.reply_to, action.request_id, action.mode)
        if isinstance(action, Reply):
            return DeadLetter("the error reply is larger than the largest message")
        raise DeliveryFailed("a dead letter is larger than the largest message")

    # -- commits and rebalances --------------------------------------------------------------

    async def _metrics_loop(self) -> None:
        assert self._metrics is not None
        while True:
            await asyncio.sleep(self._config.metrics_interval_s)
            tps = list(self._parts)
            try:
                lags = await self._consumer.lag(tps)
            except Exception as e:  # sampling must never take the intake down
                log.warning("consumer lag not sampled", extra={"error_type": type(e).__name__})
                lags = {}
            for tp in tps:
                part = self._parts.get(tp)
                if part is not None:
                    self._metrics.set_partition(
                        tp.topic,
                        tp.partition,
                        in_flight=len(part.order),
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
                async with asyncio.timeout(self._config.commit_timeout_s):
                    await self._consumer.commit(offsets)
            except (CommitFailed, KafkaPortError, TimeoutError) as e:
                log.warning(
                    "commit failed", extra={"error_type": type(e).__name__, "attempt": attempt + 1}
                )
                if attempt + 1 < attempts:
                    await asyncio.sleep(_FINAL_COMMIT_BACKOFF_S * (attempt + 1))
                continue
            for tp, offset in offsets.items():
                if tp in self._parts:
                    self._parts[tp].committed = offset
            return True
        return False

    async def _final_commit(self, tps: list[TopicPartition]) -> None:
        """The last commits before ``tps`` go away (shutdown, revocation), within
        ``commit_timeout_s`` in all: what is left uncommitted is answered again by the next
        owner, which is safe; waiting longer is not (shutdown would not be bounded)."""
        try:
            async with asyncio.timeout(self._config.commit_timeout_s):
                await self._commit(tps, attempts=_FINAL_COMMIT_ATTEMPTS)
        except Exception as e:  # out of time, or a bug: never a reason to fail shutdown
            log.warning(
                "final commit not done",
                extra={"error_type": type(e).__name__, "partitions": len(tps)},
            )

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._parts[tp] = _Partition()
        log.info("partitions assigned", extra={"partitions": sorted(str(tp) for tp in assigned)})

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        tasks = [
            task for tp in revoked if tp in self._parts for task in self._parts[tp].tasks.values()
        ]
        await self._finish(tasks, self._config.revoke_timeout_s)
        await self._final_commit([tp for tp in revoked if tp in self._parts])
        for tp in revoked:
            self._parts.pop(tp, None)
            if self._metrics is not None:
                self._metrics.forget_partition(tp.topic, tp.partition)

    def _all_tasks(self) -> list[asyncio.Task[None]]:
        return [task for part in self._parts.values() for task in part.tasks.values()]

    @staticmethod
    async def _finish(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
        """Let ``tasks`` finish within ``timeout_s``, then cancel the rest and give them a
        bounded moment to unwind (a task that ignores cancellation cannot hang shutdown)."""
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=max(1.0, timeout_s / 4))


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome, so its exception is not reported as lost."""
    if not task.cancelled():
        task.exception()
