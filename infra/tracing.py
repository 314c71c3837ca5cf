"""W3C trace context on the request path, and optional OpenTelemetry spans.

Every request belongs to a trace: the one its ``traceparent`` header names, or a new one when
it has none (or a malformed one). The worker's handling of the request is one span of that
trace; the reply, the settlement record and any dead letter carry a ``traceparent`` naming that
span as their parent, so the client, the settlement service and the worker's own log lines
(``trace_id``/``span_id`` fields, see ``infra.logs``) can all be tied to one request.

Without OpenTelemetry (the default) span ids are made here and only reach headers and logs. With
the ``otel`` extra and ``exporter`` set, spans are recorded and exported::

    og.consume (CONSUMER, from the record's arrival to its acknowledged answer)
    ├── og.infer   (the pipeline: execute, hash, sign)
    └── og.publish (PRODUCER: reply and settlement record, or the dead letter)

Span attributes never carry user data: topic, partition, offset, the model of the topic, the
mode, the outcome (``result`` or an error code) and the request id. OpenTelemetry is imported
lazily, only when tracing is configured, and no global tracer provider is installed: the
composition root owns the provider and shuts it down.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.topics import HEADER_TRACEPARENT

__all__ = [
    "RequestTrace",
    "TraceContext",
    "Tracer",
    "Tracing",
    "TracingSettings",
    "configure_tracing",
    "trace_fields",
]

# Trace ids must be unique, not secret (W3C trace context): a seeded PRNG costs a fraction of
# ``secrets`` per request. An all-zero id is invalid, and 2^-128 is not worth a branch.
_ids = random.Random()  # noqa: S311 (ids, not secrets)

OTEL_HINT = "install the otel extra: pip install 'verifiable-inference-node[otel]'"
OTLP_HINT = (
    "the OTLP exporter is not part of the otel extra: "
    "pip install opentelemetry-exporter-otlp-proto-http"
)

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

Headers = list[tuple[str, bytes]]
Attribute = str | int | float | bool


@dataclass(frozen=True)
class TraceContext:
    """The W3C ``traceparent`` fields we use: trace id, span (parent) id, sampled flag."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    @classmethod
    def parse(cls, value: bytes | str | None) -> TraceContext | None:
        """A valid ``traceparent`` value, or None (absent, malformed, all-zero ids, version ff).

        Versions above 00 may append fields; per the W3C spec the first four are read."""
        if value is None:
            return None
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return None
        match = _TRACEPARENT.match(value.strip())
        if match is None:
            return None
        version, trace_id, span_id, flags, rest = match.groups()
        if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE:
            return None
        if span_id == _ZERO_SPAN:
            return None
        return cls(trace_id, span_id, bool(int(flags, 16) & 0x01))

    @classmethod
    def new(cls) -> TraceContext:
        return cls(f"{_ids.getrandbits(128):032x}", f"{_ids.getrandbits(64):016x}")

    def child(self) -> TraceContext:
        """A new span of the same trace."""
        return TraceContext(self.trace_id, f"{_ids.getrandbits(64):016x}", self.sampled)


def _incoming(headers: Sequence[tuple[str, bytes]]) -> TraceContext | None:
    for key, value in headers:
        if key == HEADER_TRACEPARENT:
            return TraceContext.parse(value)
    return None


def trace_fields(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """Log fields for a message's trace context (``trace_id``, ``parent_span_id``), or {}.

    For consumers that only log the trace (the settlement service)."""
    ctx = _incoming(list(headers or ()))
    return {} if ctx is None else {"trace_id": ctx.trace_id, "parent_span_id": ctx.span_id}


class TracingSettings(BaseModel):
    """Span export. Trace context propagation in headers and logs is always on."""

    model_config = ConfigDict(extra="forbid")

    exporter: Literal["none", "console", "otlp"] = Field(
        default="none",
        description="where spans go: none (ids in headers and logs only), console (stdout), "
        "otlp (OTLP/HTTP; needs opentelemetry-exporter-otlp-proto-http)",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces; "
        "unset: the exporter's default (OTEL_EXPORTER_OTLP_* variables)",
    )
    service_name: str = Field(default="og-worker", description="service.name of exported spans")
    sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of new traces recorded (parent-based)"
    )


class RequestTrace:
    """The trace of one request: our span's context, the headers to publish with, spans."""

    def __init__(
        self,
        context: TraceContext,
        parent: TraceContext | None,
        headers: Headers,
        otel: tuple[Any, Any] | None = None,
    ) -> None:
        self.context = context
        self.parent = parent
        """The context the request arrived with (None: this trace started here)."""
        self.headers = headers
        """The request's headers with ``traceparent`` naming our span: what replies carry."""
        self._otel = otel  # (tracer, root span) when recording

    def set(self, **attributes: Attribute | None) -> None:
        """Attributes of the request's span (no-op unless OpenTelemetry records)."""
        if self._otel is not None:
            self._otel[1].set_attributes({k: v for k, v in attributes.items() if v is not None})

    @contextlib.contextmanager
    def span(self, name: str, *, kind: str = "INTERNAL", **attributes: Attribute) -> Iterator[None]:
        """A child span of the request's span (no-op unless OpenTelemetry records)."""
        if self._otel is None:
            yield
            return
        from opentelemetry import trace

        tracer, root = self._otel
        child = tracer.start_span(
            name,
            context=trace.set_span_in_context(root),
            kind=getattr(trace.SpanKind, kind),
            attributes=attributes,
        )
        try:
            yield
        except BaseException as e:
            _set_error(child, e)
            raise
        finally:
            child.end()

    def end(self, error: BaseException | None = None) -> None:
        if self._otel is not None:
            if error is not None:
                _set_error(self._otel[1], error)
            self._otel[1].end()


def _set_error(span: Any, error: BaseException) -> None:
    # The type only, never the message: exception texts may echo request data.
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


class Tracer:
    """Starts request traces; records OpenTelemetry spans when given an OTel tracer."""

    def __init__(self, otel_tracer: Any | None = None) -> None:
        self._otel = otel_tracer

    @property
    def recording(self) -> bool:
        return self._otel is not None

    def begin(
        self,
        headers: Sequence[tuple[str, bytes]],
        name: str = "og.consume",
        attributes: Mapping[str, Attribute] | None = None,
    ) -> RequestTrace:
        """The trace of a request that arrived with ``headers``."""
        parent = _incoming(headers)
        otel = None
        if self._otel is None:
            context = parent.child() if parent is not None else TraceContext.new()
        else:
            otel, context = self._start_otel(parent, name, attributes or {})
        out = [(k, v) for k, v in headers if k != HEADER_TRACEPARENT]
        out.append((HEADER_TRACEPARENT, context.traceparent.encode()))
        return RequestTrace(context, parent, out, otel)

    def _start_otel(
        self, parent: TraceContext | None, name: str, attributes: Mapping[str, Attribute]
    ) -> tuple[tuple[Any, Any], TraceContext]:
        from opentelemetry import trace

        parent_ctx = None
        if parent is not None:
            remote = trace.SpanContext(
                int(parent.trace_id, 16),
                int(parent.span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(0x01 if parent.sampled else 0x00),
            )
            parent_ctx = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        span = self._otel.start_span(  # type: ignore[union-attr]
            name, context=parent_ctx, kind=trace.SpanKind.CONSUMER, attributes=dict(attributes)
        )
        sc = span.get_span_context()
        context = TraceContext(
            format(sc.trace_id, "032x"), format(sc.span_id, "016x"), bool(sc.trace_flags & 0x01)
        )
        return (self._otel, span), context


class Tracing:
    """What the composition root holds: the tracer to hand out, and the provider to flush."""

    def __init__(self, tracer: Tracer, provider: Any | None = None) -> None:
        self.tracer = tracer
        self._provider = provider

    @classmethod
    def from_provider(cls, provider: Any, name: str = "og.worker") -> Tracing:
        """Tracing through an OpenTelemetry SDK ``TracerProvider`` built elsewhere (tests)."""
        return cls(Tracer(provider.get_tracer(name)), provider)

    def shutdown(self) -> None:
        """Flush and stop exporting (blocking: call it from a thread at shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()


def configure_tracing(settings: TracingSettings) -> Tracing:
    """Tracing as configured: ids only (``exporter="none"``), or an SDK provider exporting
    spans in batches. Raises ``RuntimeError`` with an install hint when a package is missing."""
    if settings.exporter == "none":
        return Tracing(Tracer())
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as e:
        raise RuntimeError(f"tracing.exporter={settings.exporter}: {OTEL_HINT}") from e
    exporter: Any
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError as e:
            raise RuntimeError(f"tracing.exporter=otlp: {OTLP_HINT}") from e
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        resource=Resource.create({"service.name": settings.service_name}),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing.from_provider(provider)
