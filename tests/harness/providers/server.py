"""A tiny HTTP/1.1 server on 127.0.0.1 for provider wire-format tests (stdlib asyncio only).

Tests script the answers (``enqueue``) and read back every request the server received
(``requests``), so they can assert what reached the "provider": headers, body, timing. When the
queue is empty the ``default`` responder answers, if one is set, else a 500.

Responses: ``JsonReply`` (status, JSON body, headers, optional delay before the answer) and
``SseReply`` (a 200 ``text/event-stream`` sent in chunks with an optional pause between events).
Connections are kept alive, as the SDKs' pooled clients expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JsonReply", "ProviderServer", "Received", "Reply", "SseReply", "slow"]


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes
    at_s: float
    """``time.monotonic()`` when the request was read."""

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class JsonReply:
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class SseReply:
    events: list[tuple[str | None, str]]
    """(event name or None, data) in order."""
    headers: dict[str, str] = field(default_factory=dict)
    pause_s: float = 0.0
    delay_s: float = 0.0


Reply = JsonReply | SseReply


def slow(reply: Reply, delay_s: float) -> Reply:
    """``reply``, sent only after ``delay_s``."""
    return dataclasses.replace(reply, delay_s=delay_s)


Responder = Callable[[Received], Reply]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
            529: "Overloaded"}  # fmt: skip


class ProviderServer:
    def __init__(self, default: Responder | None = None) -> None:
        self.default = default
        self.requests: list[Received] = []
        self._queue: list[Reply] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def enqueue(self, *replies: Reply) -> None:
        self._queue.extend(replies)

    async def start(self) -> ProviderServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> ProviderServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                received = await _read_request(reader)
                if received is None:
                    return
                self.requests.append(received)
                reply = self._next(received)
                await asyncio.sleep(reply.delay_s)
                if isinstance(reply, JsonReply):
                    await _write_json(writer, reply)
                else:
                    await _write_sse(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # a cancelled handler ends quietly: the server is closing
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    def _next(self, received: Received) -> Reply:
        if self._queue:
            return self._queue.pop(0)
        if self.default is not None:
            return self.default(received)
        return JsonReply({"error": {"type": "server_error", "message": "nothing scripted"}}, 500)


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return Received(method, path, headers, body, time.monotonic())


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write_json(writer: asyncio.StreamWriter, reply: JsonReply) -> None:
    body = json.dumps(reply.body).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    writer.write(_head(reply.status, headers | reply.headers) + body)
    await writer.drain()


async def _write_sse(writer: asyncio.StreamWriter, reply: SseReply) -> None:
    headers = {"content-type": "text/event-stream", "transfer-encoding": "chunked"}
    writer.write(_head(200, headers | reply.headers))
    for i, (event, data) in enumerate(reply.events):
        if i and reply.pause_s:
            await asyncio.sleep(reply.pause_s)
        text = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
        chunk = text.encode()
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
