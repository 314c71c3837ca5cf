"""``infra.tracing``: trace context (W3C traceparent) and OpenTelemetry spans. The JSON logs that
carry request and trace ids are tested in test_logs.py."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from infra.tracing import (
    TraceContext,
    Tracer,
    Tracing,
    TracingSettings,
    configure_tracing,
    trace_fields,
)

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (PARENT, TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True)),
        (PARENT.encode(), TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")),
        (
            PARENT[:-2] + "00",
            TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", False),
        ),
        # A later version may append fields: the first four are read.
        (
            "cc" + PARENT[2:] + "-what-the-future-holds",
            TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
        ),
        (PARENT.upper(), None),
        ("ff" + PARENT[2:], None),
        (PARENT + "-extra", None),  # version 00 has exactly four fields
        ("00-" + "0" * 32 + "-b7ad6b7169203331-01", None),
        ("00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01", None),
        ("00-abc-def-01", None),
        (b"\xff\xfe", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_parsing(value: str | bytes | None, expected: TraceContext | None) -> None:
    assert TraceContext.parse(value) == expected


def test_a_request_without_traceparent_gets_one() -> None:
    headers = [("og-schema-version", b"1")]
    trace = Tracer().begin(headers)
    assert trace.parent is None
    parsed = TraceContext.parse(dict(trace.headers)["traceparent"])
    assert parsed == trace.context
    assert trace.headers[0] == ("og-schema-version", b"1")
    assert headers == [("og-schema-version", b"1")]  # the record's own headers are untouched


def test_a_traced_request_keeps_its_trace_under_a_new_span() -> None:
    trace = Tracer().begin([("traceparent", PARENT.encode()), ("og-attempts", b"2")])
    assert trace.parent == TraceContext.parse(PARENT)
    assert trace.context.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert trace.context.span_id != "b7ad6b7169203331"
    traceparents = [v for k, v in trace.headers if k == "traceparent"]
    assert traceparents == [trace.context.traceparent.encode()]
    assert ("og-attempts", b"2") in trace.headers
    # A malformed traceparent starts a new trace instead of propagating garbage.
    fresh = Tracer().begin([("traceparent", b"garbage")])
    assert fresh.parent is None
    assert TraceContext.parse(dict(fresh.headers)["traceparent"]) == fresh.context


def test_trace_fields_for_settlement_logs() -> None:
    assert trace_fields([("traceparent", PARENT.encode())]) == {
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "parent_span_id": "b7ad6b7169203331",
    }
    assert trace_fields(None) == {}
    assert trace_fields([("traceparent", b"nope")]) == {}


@pytest.fixture
def spans() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing.from_provider(provider)
    yield tracing, exporter
    tracing.shutdown()


def test_otel_spans_consume_infer_publish(spans: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = spans
    assert tracing.tracer.recording
    trace = tracing.tracer.begin(
        [("traceparent", PARENT.encode())], attributes={"og.model": "demo-mlp"}
    )
    with trace.span("og.infer"):
        pass
    with (
        pytest.raises(ValueError, match="secret prompt"),
        trace.span("og.publish", kind="PRODUCER"),
    ):
        raise ValueError("secret prompt")
    trace.set(**{"og.outcome": "result", "og.request_id": "r-1", "unset": None})
    trace.end()

    by_name = {s.name: s for s in exporter.get_finished_spans()}
    assert set(by_name) == {"og.consume", "og.infer", "og.publish"}
    root = by_name["og.consume"]
    assert format(root.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent is not None and format(root.parent.span_id, "016x") == "b7ad6b7169203331"
    # The traceparent we publish names our consume span.
    assert trace.context.span_id == format(root.context.span_id, "016x")
    for child in ("og.infer", "og.publish"):
        assert by_name[child].parent is not None
        assert by_name[child].parent.span_id == root.context.span_id
    publish = by_name["og.publish"]
    assert publish.status.status_code is StatusCode.ERROR
    assert publish.status.description == "ValueError"  # the type, never the message
    assert not publish.events  # no recorded exception (its text may echo user data)
    assert dict(root.attributes or {}) == {
        "og.model": "demo-mlp",
        "og.outcome": "result",
        "og.request_id": "r-1",
    }


def test_otel_root_span_for_an_untraced_request(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    trace = tracing.tracer.begin([])
    trace.end(RuntimeError("x"))
    (root,) = exporter.get_finished_spans()
    assert root.parent is None
    assert format(root.context.trace_id, "032x") == trace.context.trace_id
    assert root.status.status_code is StatusCode.ERROR


def test_configure_tracing() -> None:
    assert not configure_tracing(TracingSettings()).tracer.recording
    console = configure_tracing(TracingSettings(exporter="console", sample_ratio=0.0))
    assert console.tracer.recording
    console.shutdown()
    try:
        otlp_installed = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http")
    except ModuleNotFoundError:
        otlp_installed = None
    if otlp_installed is None:
        with pytest.raises(RuntimeError, match="opentelemetry-exporter-otlp-proto-http"):
            configure_tracing(TracingSettings(exporter="otlp"))
    else:
        otlp = configure_tracing(TracingSettings(exporter="otlp"))
        assert otlp.tracer.recording
        otlp.shutdown()
