"""Health and metrics over HTTP for the long-running services, with no web framework.

``HealthServer`` is a tiny HTTP/1.1 server on ``asyncio.start_server`` (one request per
connection, GET/HEAD only, bounded request size and read time) serving:

- ``/metrics``: Prometheus text exposition of one service's own ``CollectorRegistry``;
- ``/healthz``: liveness. Answering at all proves the event loop runs (a blocked loop cannot
  answer, and the probe times out); it also fails while the worst scheduling lag measured in
  the last ``loop_lag_window_s`` exceeds ``max_loop_lag_s`` (a loop starved by blocking calls),
  or when a liveness check fails;
- ``/readyz``: readiness, a list of named checks (models loaded, broker reachable,
  registration published, ...): 200 with JSON when all pass, 503 naming those that failed.

A check is a callable returning ``bool`` or an awaitable of ``bool``. Synchronous checks run on
the event loop and must be quick (read an attribute); anything doing I/O must be async. Each
check has a time limit; an exception or a timeout counts as a failure (logged by type only).

The module also holds what both services' metrics share: :func:`kafka_reachable` (an async
Kafka ApiVersions probe, TLS when the cluster uses it) and :class:`LabelGuard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
import secrets
import ssl
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from infra.kafka import KafkaSettings

__all__ = [
    "Check",
    "HealthServer",
    "LabelGuard",
    "kafka_api_versions",
    "kafka_reachable",
]

log = logging.getLogger(__name__)

Check = Callable[[], bool | Awaitable[bool]]

OTHER: Final = "other"
_MAX_REQUEST_HEAD_BYTES = 8192
_READ_TIMEOUT_S = 5.0
_LOOP_TICK_S = 0.25
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_API_VERSIONS_KEY = 18
_UNSUPPORTED_VERSION = 35


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port. Lifecycle: ``start`` → ``stop``
    (or ``async with``). ``port=0`` binds a free port (see ``port`` after ``start``)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        registry: CollectorRegistry | None = None,
        ready: Mapping[str, Check] | None = None,
        live: Mapping[str, Check] | None = None,
        check_timeout_s: float = 2.0,
        max_loop_lag_s: float = 5.0,
        loop_lag_window_s: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._ready: dict[str, Check] = dict(ready or {})
        self._live: dict[str, Check] = dict(live or {})
        self._check_timeout_s = check_timeout_s
        self._max_loop_lag_s = max_loop_lag_s
        self._lag_window_s = loop_lag_window_s
        self._lags: deque[tuple[float, float]] = deque()
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def loop_lag_s(self) -> float:
        """Worst event-loop scheduling delay measured within the window."""
        return max((lag for _, lag in self._lags), default=0.0)

    def add_ready_check(self, name: str, check: Check) -> None:
        """Add (or replace) a readiness check, e.g. once the part it watches exists."""
        self._ready[name] = check

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "/readyz") -> str:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "", "::") else self._host  # noqa: S104
        return f"http://{host}:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=_MAX_REQUEST_HEAD_BYTES
        )
        self._ticker = asyncio.create_task(self._measure_loop_lag())
        log.info("health server listening", extra={"port": self.port})

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- checks ------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, bool]]:
        results = await self._run(self._ready)
        return all(results.values()), results

    async def liveness(self) -> tuple[bool, dict[str, bool]]:
        results = await self._run(self._live)
        results["event_loop"] = self.loop_lag_s <= self._max_loop_lag_s
        return all(results.values()), results

    async def _run(self, checks: Mapping[str, Check]) -> dict[str, bool]:
        names = list(checks)
        outcomes = await asyncio.gather(*(self._one(n, checks[n]) for n in names))
        return dict(zip(names, outcomes, strict=True))

    async def _one(self, name: str, check: Check) -> bool:
        try:
            result = check()
            if inspect.isawaitable(result):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
                # of a probe that the server's shutdown cancels.
                async with asyncio.timeout(self._check_timeout_s):
                    result = await result
            return bool(result)
        except Exception as e:
            log.warning("health check failed", extra={"check": name, "error": type(e).__name__})
            return False

    async def _measure_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + _LOOP_TICK_S
            await asyncio.sleep(_LOOP_TICK_S)
            now = loop.time()
            self._lags.append((now, max(0.0, now - expected)))
            while self._lags and self._lags[0][0] < now - self._lag_window_s:
                self._lags.popleft()

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                await self._respond(writer, 400, b"bad request\n", "text/plain", head_only=False)
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                await self._respond(writer, 400, b"bad request\n", "text/plain", head_only=False)
                return
            method, target = parts[0], parts[1]
            head_only = method == "HEAD"
            if method not in ("GET", "HEAD"):
                await self._respond(
                    writer, 405, b"method not allowed\n", "text/plain", head_only, ("GET, HEAD")
                )
                return
            status, body, content_type = await self._route(target.split("?", 1)[0])
            await self._respond(writer, status, body, content_type, head_only)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics" and self._registry is not None:
            # Off the loop: collecting walks every series (and the process collector reads
            # /proc); a few milliseconds that requests should not wait behind.
            body = await asyncio.to_thread(generate_latest, self._registry)
            return 200, body, CONTENT_TYPE_LATEST
        if path == "/healthz":
            ok, checks = await self.liveness()
            doc: dict[str, Any] = {
                "status": "alive" if ok else "unhealthy",
                "loop_lag_s": round(self.loop_lag_s, 4),
                "checks": checks,
            }
        elif path == "/readyz":
            ok, checks = await self.readiness()
            doc = {
                "status": "ready" if ok else "not ready",
                "checks": checks,
                "failed": sorted(name for name, passed in checks.items() if not passed),
            }
        else:
            return 404, b"not found\n", "text/plain; charset=utf-8"
        return (200 if ok else 503), json.dumps(doc).encode() + b"\n", "application/json"

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        head_only: bool,
        allow: str | None = None,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if allow is not None:
            lines.append(f"Allow: {allow}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        await writer.drain()


# -- Kafka ----------------------------------------------------------------------------------


def _bootstrap(servers: str) -> list[tuple[str, int]]:
    out = []
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


async def kafka_api_versions(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, timeout_s: float = 1.0
) -> bool:
    """True when a Kafka broker on ``host:port`` answers an ApiVersions v0 request.

    The answer must carry our correlation id and error code 0 (or UNSUPPORTED_VERSION, which a
    broker that dropped v0 sends together with its supported range: it is still reachable).
    Any connection error, timeout or malformed answer is False. Never blocks the loop."""
    correlation_id = secrets.randbelow(2**31 - 1) + 1
    client_id = b"og-health"
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(client_id)) + client_id
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
            writer.write(struct.pack(">i", len(body)) + body)
            await writer.drain()
            (size,) = struct.unpack(">i", await reader.readexactly(4))
            if not 6 <= size <= 1 << 20:
                return False
            got_id, error_code = struct.unpack(">ih", await reader.readexactly(6))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, struct.error, ssl.SSLError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return got_id == correlation_id and error_code in (0, _UNSUPPORTED_VERSION)


def kafka_reachable(kafka: KafkaSettings, timeout_s: float = 1.0) -> Check:
    """A readiness check: some bootstrap server answers ApiVersions (over TLS for SSL and
    SASL_SSL clusters; ApiVersions needs no authentication)."""
    servers = _bootstrap(kafka.bootstrap_servers)
    use_tls = kafka.security_protocol in ("SSL", "SASL_SSL")
    context = ssl.create_default_context() if use_tls else None

    async def broker_reachable() -> bool:
        results = await asyncio.gather(
            *(
                kafka_api_versions(h, p, ssl_context=context, timeout_s=timeout_s)
                for h, p in servers
            )
        )
        return any(results)

    return broker_reachable


class LabelGuard:
    """Keeps one metric label's values bounded.

    A value is kept when it is in ``allowed`` (if given) and matches ``pattern`` (if given),
    and at most ``limit`` distinct values are ever kept; anything else becomes ``other``. The
    last line of defence against a label exploding into one series per request.
    """

    def __init__(
        self, *, allowed: Iterable[str] | None = None, pattern: str | None = None, limit: int = 64
    ) -> None:
        self._allowed = frozenset(allowed) if allowed is not None else None
        self._pattern = re.compile(pattern) if pattern is not None else None
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if (self._allowed is not None and value not in self._allowed) or (
            self._pattern is not None and self._pattern.fullmatch(value) is None
        ):
            return OTHER
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
        return value
