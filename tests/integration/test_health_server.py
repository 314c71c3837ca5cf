"""HealthServer over real loopback sockets, the Kafka probe's negative paths, and the
``inference-node check`` logic against the server."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
from prometheus_client import CollectorRegistry, Counter

from infra.dev.broker import free_port
from infra.health import HealthServer, kafka_api_versions, kafka_reachable
from infra.kafka import KafkaSettings
from nodecli.check import check
from nodecli.check import main as check_main


async def _get(url: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.request(method, url)


async def test_liveness_readiness_and_metrics() -> None:
    registry = CollectorRegistry()
    served = Counter("og_test_served", "test counter", registry=registry)
    served.inc(3)
    state = {"models": True}

    async def broker_ok() -> bool:
        await asyncio.sleep(0)
        return True

    async with HealthServer(
        registry=registry, ready={"models_loaded": lambda: state["models"], "broker": broker_ok}
    ) as server:
        live = await _get(server.url("/healthz"))
        assert live.status_code == 200
        assert live.json()["status"] == "alive"
        assert live.json()["checks"]["event_loop"] is True

        ready = await _get(server.url("/readyz"))
        assert ready.status_code == 200
        assert ready.headers["content-type"] == "application/json"
        assert ready.json() == {
            "status": "ready",
            "checks": {"models_loaded": True, "broker": True},
            "failed": [],
        }

        state["models"] = False
        not_ready = await _get(server.url("/readyz?verbose=1"))
        assert not_ready.status_code == 503
        assert not_ready.json()["failed"] == ["models_loaded"]

        metrics = await _get(server.url("/metrics"))
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=")
        assert "og_test_served_total 3.0" in metrics.text


async def test_failing_slow_and_late_checks() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    async def slow() -> bool:
        await asyncio.sleep(10)
        return True

    async with HealthServer(ready={"broken": broken, "slow": slow}, check_timeout_s=0.2) as s:
        started = time.monotonic()
        response = await _get(s.url("/readyz"))
        assert time.monotonic() - started < 2
        assert response.status_code == 503
        assert response.json()["failed"] == ["broken", "slow"]
        s.add_ready_check("broken", lambda: True)
        s.add_ready_check("slow", lambda: True)
        s.add_ready_check("registration_published", lambda: True)
        assert (await _get(s.url("/readyz"))).status_code == 200


async def test_liveness_fails_on_a_failed_live_check() -> None:
    async with HealthServer(live={"publisher": lambda: False}) as server:
        response = await _get(server.url("/healthz"))
        assert response.status_code == 503
        assert response.json()["checks"] == {"publisher": False, "event_loop": True}


async def test_liveness_reports_a_blocked_loop() -> None:
    async with HealthServer(max_loop_lag_s=0.3, loop_lag_window_s=1.0) as server:
        await asyncio.sleep(0.3)  # let the lag ticker start
        time.sleep(0.8)  # blocking the loop on purpose
        await asyncio.sleep(0.3)
        response = await _get(server.url("/healthz"))
        assert server.loop_lag_s > 0.3
        assert response.status_code == 503
        assert response.json()["checks"]["event_loop"] is False
        await asyncio.sleep(1.2)  # the window moves past the stall
        assert (await _get(server.url("/healthz"))).status_code == 200


async def test_http_edges() -> None:
    async with HealthServer() as server:
        assert (await _get(server.url("/nope"))).status_code == 404
        assert (await _get(server.url("/metrics"))).status_code == 404  # no registry given
        post = await _get(server.url("/readyz"), method="POST")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"
        head = await _get(server.url("/readyz"), method="HEAD")
        assert head.status_code == 200
        assert head.content == b""

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GARBAGE\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()

        # An oversized request head is refused, not buffered.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /readyz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()


async def test_check_command_exit_codes() -> None:
    state = {"ok": True}
    async with HealthServer(ready={"broker": lambda: state["ok"]}) as server:
        assert await asyncio.to_thread(check, server.url("/readyz")) == 0
        state["ok"] = False
        assert await asyncio.to_thread(check, server.url("/readyz")) == 1
        assert await asyncio.to_thread(check_main, ["--url", server.url("/readyz")]) == 1
    # Nothing listening any more: connection refused is "not ready", not a crash.
    assert await asyncio.to_thread(check, f"http://127.0.0.1:{free_port()}/readyz", 1.0) == 1
    assert check("ftp://example.invalid/readyz") == 2


async def test_kafka_probe_rejects_what_is_not_a_broker() -> None:
    port = free_port()
    assert await kafka_api_versions("127.0.0.1", port, timeout_s=0.5) is False  # refused

    async def http_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http_only, "127.0.0.1", 0)
    other = server.sockets[0].getsockname()[1]
    try:
        assert await kafka_api_versions("127.0.0.1", other, timeout_s=0.5) is False
        check_fn = kafka_reachable(KafkaSettings(bootstrap_servers=f"127.0.0.1:{other}"))
        assert await check_fn() is False  # type: ignore[misc]
    finally:
        server.close()
        await server.wait_closed()

    # A listener that accepts and never answers: the probe gives up at its time limit.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        started = time.monotonic()
        assert (
            await kafka_api_versions("127.0.0.1", silent.getsockname()[1], timeout_s=0.3) is False
        )
        assert time.monotonic() - started < 2
    finally:
        silent.close()


async def test_readiness_json_is_machine_readable() -> None:
    async with HealthServer(ready={"a": lambda: True}) as server:
        raw = (await _get(server.url("/readyz"))).content
        assert json.loads(raw)["status"] == "ready"
