"""``infra.logs``: JSON log lines carry request and trace ids (per task), and user data never
reaches the log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from infra.logs import ContextFilter, JsonFormatter, bind_log_context, log_context


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
