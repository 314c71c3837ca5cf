"""Trace context (W3C traceparent), OpenTelemetry spans and JSON logs with request/trace ids."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from worker.logs import ContextFilter, JsonFormatter, bind_log_context, log_context
from worker.tracing import (
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


# -- logs -----------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("og.test.telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_log_lines_carry_request_and_trace_ids(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    logger.info("outside")
    with log_context(request_id="r-1", trace_id="a" * 32, span_id="b" * 16):
        logger.info("inside", extra={"model": "demo-mlp"})
        with log_context(span_id="c" * 16):
            logger.info("nested")
        logger.info("explicit wins", extra={"request_id": "r-2"})
    outside, inside, nested, explicit = _lines(stream)
    assert "request_id" not in outside and "trace_id" not in outside
    assert inside["request_id"] == "r-1"
    assert inside["trace_id"] == "a" * 32
    assert inside["span_id"] == "b" * 16
    assert inside["model"] == "demo-mlp"
    assert nested["span_id"] == "c" * 16 and nested["request_id"] == "r-1"
    assert explicit["request_id"] == "r-2"


async def test_concurrent_requests_keep_their_own_ids(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log

    async def handle(request_id: str) -> None:
        bind_log_context(request_id=request_id)
        for _ in range(3):
            await asyncio.sleep(0)
            logger.info("step", extra={"expect": request_id})

    await asyncio.gather(*(asyncio.create_task(handle(f"r-{i}")) for i in range(5)))
    lines = _lines(stream)
    assert len(lines) == 15
    assert all(line["request_id"] == line["expect"] for line in lines)


def test_user_data_never_reaches_the_log(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_log
    secret = "my secret prompt about my medical condition"
    logger.warning(
        "careless call site",
        extra={"prompt": secret, "Payload": {"text": secret}, "output": secret, "model": "m"},
    )
    try:
        raise ValueError(secret)
    except ValueError:
        logger.exception("engine failed")
    text = stream.getvalue()
    assert secret not in text
    careless, failed = _lines(stream)
    assert careless["prompt"] == careless["Payload"] == careless["output"] == "[redacted]"
    assert careless["model"] == "m"
    assert failed["exc_type"] == "ValueError"
