"""What the intake records about each request: metrics and its trace.

Each request is counted once by outcome when its answer is acknowledged, with its queue wait,
pipeline and end-to-end times. Each runs in a trace (the request's ``traceparent``, or a new
one) whose ids are bound to every log line written on its behalf and travel on its answer.
Labels are bounded: the model of the topic the record arrived on (topics this worker
subscribes to), the verification mode and the outcome code; never a request id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from infra.kafka.ports import Headers, Record
from infra.logs import bind_log_context
from infra.tracing import Attribute, RequestTrace, Tracer
from schemas.results import ErrorReply
from schemas.topics import Topics
from worker.handler import Action, DeadLetter, Duplicate, Reply
from worker.metrics import WorkerMetrics

__all__ = ["Job", "RecordObserver", "outcome_label"]


@dataclass
class Job:
    """What is known about one record while it is handled."""

    model: str
    trace: RequestTrace
    timestamp_ms: int

    @property
    def headers(self) -> Headers:
        """The headers every message published for this record carries (its trace)."""
        return self.trace.headers


def outcome_label(action: Action) -> str:
    if isinstance(action, Duplicate):
        return "duplicate"
    if isinstance(action, DeadLetter):
        return "dead_letter"
    outcome = action.outcome
    if outcome.error_code is not None:
        return outcome.error_code.value
    return outcome.reply.code.value if isinstance(outcome.reply, ErrorReply) else "result"


def _since_s(timestamp_ms: int) -> float | None:
    """Seconds since a record timestamp (None when the record has none)."""
    return time.time() - timestamp_ms / 1000 if timestamp_ms > 0 else None


class RecordObserver:
    def __init__(self, topics: Topics, metrics: WorkerMetrics | None, tracer: Tracer) -> None:
        self._topics = topics
        self._metrics = metrics
        self._tracer = tracer

    def begin(self, record: Record) -> Job:
        """Start the record's trace and bind its ids to this task's log lines."""
        model = self._topics.model_of(record.topic) or "unknown"
        attributes: dict[str, Attribute] | None = None
        if self._tracer.recording:
            attributes = {
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
                "og.model": model,
            }
        headers = [(k, v) for k, v in (record.headers or ()) if v is not None]
        trace = self._tracer.begin(headers, attributes=attributes)
        bind_log_context(trace_id=trace.context.trace_id, span_id=trace.context.span_id)
        return Job(model, trace, record.timestamp)

    def started(self, job: Job) -> None:
        if self._metrics is not None:
            waited_s = _since_s(job.timestamp_ms)
            if waited_s is not None:
                self._metrics.request_started(job.model, waited_s)

    def executed(self, job: Job, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.inference_done(job.model, seconds)

    def finished(self, job: Job, action: Action) -> None:
        outcome = outcome_label(action)
        if self._metrics is not None:
            e2e_s = None if isinstance(action, Duplicate) else _since_s(job.timestamp_ms)
            mode = action.mode if isinstance(action, Reply | Duplicate) else "unknown"
            self._metrics.request_finished(job.model, mode, outcome, e2e_s)
        job.trace.set(**{"og.outcome": outcome})

    def abandoned(self, job: Job) -> None:
        if self._metrics is not None:
            self._metrics.request_abandoned(job.model)
