"""One run of a batch job: resume what an earlier run left, send the rest, record outcomes.

The order of a run, and why it cannot duplicate or lose a line:

1. Note the reply topic's end offsets and record them as this session's start (committed
   before anything is sent: every reply to this run's requests lies after them).
2. Start the client (it reads replies from the end of the reply topic), then, if an earlier
   run left lines sent and unanswered, start ``ReplyRecovery``: a consumer of its own reading
   the reply topic from the earliest start of the sessions that sent them, and on for as long
   as one of them is unanswered. Replies that arrived while no client listened are found
   there; wait until it has read up to the end it saw at its start.
3. Go through the input in order. A finished line is skipped. An invalid line is finished as
   ``invalid_line`` and never sent. An open line already answered in step 2 is finished from
   that reply; any other line is marked sent (committed per chunk) and then sent, at most
   ``max_in_flight`` at a time, under its deterministic request id ``<job id>-<line>``. So an
   open line is sent again as the same request: the worker drops the copy if it still holds
   the first one, and the answer reaches this run through the client or through recovery,
   whichever sees it first.
4. Each reply is verified (``verify_result`` against the request) and finished; finished lines
   are committed every ``flush_interval_s``. No reply within ``timeout_s`` finishes the line as
   ``timeout``.

Cancellation (``cancel`` sets a flag in the state from another process) is polled every
``cancel_poll_s``: sending stops, requests in flight get ``cancel_grace_s`` to be answered, and
the rest are written as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.batch.lines import BatchLine, InvalidLine, LineParser, iter_raw_lines
from client.batch.outputs import rebuild_request
from client.batch.progress import Progress
from client.batch.recovery import ReplyRecovery
from client.batch.state import FinishedLine, JobState, SentLine
from client.requests import build_request
from client.transport import InferenceClient, ReplyTimeout
from infra.kafka.ports import Consumer, Kafka, KafkaPortError, TopicPartition
from schemas.requests import InferenceRequest
from schemas.results import ErrorReply, InferenceResult, SealedResult
from schemas.verify.result import VerificationReport, verify_error, verify_result

__all__ = ["BatchError", "BatchOptions", "BatchRun"]

_Pending = tuple[BatchLine, InferenceRequest, "asyncio.Future[Any] | None"]
"""A line to send, its request, and its recovery future when an earlier run sent it."""


class BatchError(Exception):
    """The job cannot run as asked (another input file, cancelled, busy, no reply topic)."""


@dataclass(frozen=True)
class BatchOptions:
    max_in_flight: int = 256
    timeout_s: float = 60.0
    """How long to wait for a line's reply after it is sent (then: ``timeout``)."""
    deadline_s: float | None = None
    """Sent with each request: a worker that picks it up later answers deadline_exceeded."""
    include_requests: bool = True
    """Write each result's request into the output line (for ``inference-node verify``)."""
    sent_chunk: int = 64
    flush_interval_s: float = 0.25
    cancel_poll_s: float = 0.5
    cancel_grace_s: float = 10.0
    catch_up_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.sent_chunk < 1:
            raise ValueError("max_in_flight and sent_chunk must be at least 1")
        if self.timeout_s <= 0 or (self.deadline_s is not None and self.deadline_s <= 0):
            raise ValueError("timeout_s and deadline_s must be positive")


class BatchRun:
    """One run over a job's state. ``run`` returns this run's counts; the state holds the rest."""

    def __init__(
        self,
        state: JobState,
        input_path: Path,
        kafka: Kafka,
        client: InferenceClient,
        options: BatchOptions,
        progress: Progress,
    ) -> None:
        self._state = state
        self._input = input_path
        self._kafka = kafka
        self._client = client
        self._options = options
        self._progress = progress
        self._job_id = state.info.job_id
        self._session = 0
        self._slots = asyncio.Semaphore(options.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._buffer: list[FinishedLine] = []
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self.cancelled = False
        self.finished_here = 0
        self.resent = 0
        self.recovered = 0

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Steps 1-4 of the module docstring. The client must not be started yet."""
        consumer: Consumer | None = self._kafka.consumer(None)
        assert consumer is not None
        await consumer.start()
        recovery: ReplyRecovery | None = None
        try:
            tps, ends = await self._reply_partitions(consumer)
            self._session = self._state.begin_session({tp.partition: ends[tp] for tp in tps})
            open_lines = {s.line: s for s in self._state.open_lines()}
            await self._client.start()
            if open_lines:
                # Started after the client: together they see every reply from the earliest
                # session start on (the client from its end, this from the sessions' starts).
                recovery = ReplyRecovery(consumer, tps, list(open_lines.values()), self._authentic)
                consumer = None  # recovery owns it now
                await recovery.start(self._state)
                await recovery.caught_up(self._options.catch_up_timeout_s)
            else:
                await consumer.stop()
                consumer = None
            await self._send_all(open_lines, recovery)
        finally:
            if recovery is not None:
                await recovery.stop()
            if consumer is not None:
                await consumer.stop()
        if self._failure is not None:
            raise self._failure

    async def _send_all(
        self, open_lines: dict[int, SentLine], recovery: ReplyRecovery | None
    ) -> None:
        background = [
            asyncio.create_task(self._flush_periodically()),
            asyncio.create_task(self._watch_cancel()),
        ]
        try:
            await self._dispatch(open_lines, recovery)
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self._flush()

    async def _reply_partitions(
        self, consumer: Consumer
    ) -> tuple[list[TopicPartition], dict[TopicPartition, int]]:
        partitions = await consumer.partitions_for(self._client.reply_to)
        if not partitions:
            raise BatchError(f"reply topic {self._client.reply_to} does not exist")
        tps = [TopicPartition(self._client.reply_to, p) for p in sorted(partitions)]
        consumer.assign(tps)
        return tps, await consumer.end_offsets(tps)

    async def _dispatch(
        self, open_lines: dict[int, SentLine], recovery: ReplyRecovery | None
    ) -> None:
        finished = self._state.finished_line_numbers()
        parser = LineParser()  # every line, finished or not: repeated custom_ids are found
        chunk: list[_Pending] = []
        for number, raw in iter_raw_lines(self._input):
            parsed = parser.parse(number, raw)
            if number in finished:
                continue
            if self._stop.is_set():
                break
            if isinstance(parsed, InvalidLine):
                self._finish(
                    FinishedLine(
                        number,
                        parsed.custom_id,
                        "invalid_line",
                        code="invalid_line",
                        message=parsed.reason,
                    )
                )
                continue
            sent = open_lines.get(number)
            recovered = None
            if sent is not None and recovery is not None:
                recovered = recovery.futures[sent.request_id]
            if sent is not None and recovered is not None and recovered.done():
                request = self._rebuild(parsed, sent)
                self._finish(self._outcome(parsed, request, recovered.result()))
                self.recovered += 1
                continue
            if sent is not None:
                # The same request again, times included: the worker's answer to the first
                # copy commits to those times, and must verify against what is written.
                self.resent += 1
                chunk.append((parsed, self._rebuild(parsed, sent), recovered))
            else:
                chunk.append((parsed, self._new_request(parsed), None))
            if len(chunk) >= self._options.sent_chunk:
                await self._send_chunk(chunk)
                chunk = []
            await asyncio.sleep(0)  # let replies in between lines of a long invalid stretch
        if chunk and not self._stop.is_set():
            await self._send_chunk(chunk)

    def _new_request(self, line: BatchLine) -> InferenceRequest:
        return build_request(
            line.model,
            line.payload,
            request_id=f"{self._job_id}-{line.number}",
            reply_to=self._client.reply_to,
            deadline_s=self._options.deadline_s,
        )

    async def _send_chunk(self, chunk: list[_Pending]) -> None:
        # Committed before the first is produced; a line sent before keeps its row (and the
        # session whose start offsets precede its first answer).
        self._state.mark_sent(
            [
                SentLine(
                    line.number,
                    line.custom_id,
                    request.request_id,
                    line.model,
                    self._session,
                    request.created_unix_ms,
                    request.deadline_unix_ms,
                )
                for line, request, _ in chunk
            ]
        )
        for line, request, recovered in chunk:
            await self._slots.acquire()
            if self._stop.is_set():
                self._slots.release()
                return  # marked sent, never produced: open, written as cancelled
            task = asyncio.create_task(self._one(line, request, recovered))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _reply(
        self, request: InferenceRequest, recovered: asyncio.Future[Any] | None
    ) -> object:
        """The reply to ``request``: through the client, or (a line sent by an earlier run)
        through recovery, whichever comes first."""
        if recovered is None:
            return await self._client.request(request, timeout_s=self._options.timeout_s)
        sending = asyncio.ensure_future(
            self._client.request(request, timeout_s=self._options.timeout_s)
        )
        try:
            await asyncio.wait([sending, recovered], return_when=asyncio.FIRST_COMPLETED)
            return recovered.result() if recovered.done() else sending.result()
        finally:
            if not sending.done():
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, ReplyTimeout):
                    await sending

    async def _one(
        self, line: BatchLine, request: InferenceRequest, recovered: asyncio.Future[Any] | None
    ) -> None:
        try:
            reply = await self._reply(request, recovered)
        except ReplyTimeout:
            self._finish(
                self._error(line, request, "timeout", "no reply within the timeout", "timeout")
            )
        except KafkaPortError as e:
            message = f"the request could not be produced ({type(e).__name__})"
            self._finish(self._error(line, request, "error", message, "send_failed"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # our bug: stop the run (the state stays resumable)
            self._failure = e
            self._stop.set()
        else:
            self._finish(self._outcome(line, request, reply))

    async def _drain(self) -> None:
        if not self._tasks:
            return
        if not self._stop.is_set():
            # Each task ends within timeout_s; a cancel arriving meanwhile cuts the wait short.
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([*self._tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            while self._tasks and not self._stop.is_set():
                await asyncio.wait([*self._tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._options.cancel_grace_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- outcomes ---------------------------------------------------------------------------

    def _rebuild(self, line: BatchLine, sent: SentLine) -> InferenceRequest:
        request = rebuild_request(
            line,
            FinishedLine(
                line.number,
                line.custom_id,
                "open",
                sent.request_id,
                sent.model,
                created_unix_ms=sent.created_unix_ms,
                deadline_unix_ms=sent.deadline_unix_ms,
            ),
            self._client.reply_to,
        )
        assert request is not None  # a sent line has its id, model and times
        return request

    def _outcome(self, line: BatchLine, request: InferenceRequest, reply: object) -> FinishedLine:
        if isinstance(reply, InferenceResult):
            report = self._verify(reply, request)
            usage = reply.envelope.usage
            return self._line(
                line,
                request,
                "result",
                reply=reply.model_dump_json(),
                verified=report.ok,
                failed_checks=tuple(c.name for c in report.checks if not c.ok),
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
            )
        if isinstance(reply, ErrorReply):
            return self._line(
                line,
                request,
                "error",
                code=reply.code.value,
                message=reply.message,
                reply=reply.model_dump_json(),
            )
        message = "an unexpected kind of reply answered the request"
        return self._error(line, request, "error", message, "unexpected_reply")

    def _verify(self, result: InferenceResult, request: InferenceRequest) -> VerificationReport:
        """The verdict written for a result: the one place that decides it (a reply that came
        through recovery was read by no client, so it is checked here like every other)."""
        return verify_result(result, request, trust=self._client.trust.snapshot())

    def _authentic(self, reply: InferenceResult | SealedResult | ErrorReply) -> bool:
        """Whether a reply read by recovery was signed by a node this client trusts."""
        trust = self._client.trust.snapshot()
        if isinstance(reply, ErrorReply):
            return verify_error(reply, trust=trust).ok
        if isinstance(reply, SealedResult):
            return False  # batch lines are never sealed
        return verify_result(reply, trust=trust).ok

    def _error(
        self, line: BatchLine, request: InferenceRequest, outcome: str, message: str, code: str
    ) -> FinishedLine:
        return self._line(line, request, outcome, code=code, message=message)

    @staticmethod
    def _line(
        line: BatchLine, request: InferenceRequest, outcome: str, **fields: Any
    ) -> FinishedLine:
        return FinishedLine(
            line.number,
            line.custom_id,
            outcome,
            request.request_id,
            request.model,
            created_unix_ms=request.created_unix_ms,
            deadline_unix_ms=request.deadline_unix_ms,
            **fields,
        )

    def _finish(self, line: FinishedLine) -> None:
        self._buffer.append(line)
        self._progress.advance()
        self.finished_here += 1
        if len(self._buffer) >= self._options.max_in_flight:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            lines, self._buffer = self._buffer, []
            self._state.finish(lines)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._options.flush_interval_s)
            self._flush()

    async def _watch_cancel(self) -> None:
        while True:
            await asyncio.sleep(self._options.cancel_poll_s)
            if self._state.cancelled:
                self.cancelled = True
                self._stop.set()
                return
