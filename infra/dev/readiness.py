"""Readiness of the local stack's services, read from their health endpoints (``/readyz``).

The services serve ``/metrics``, ``/healthz`` and ``/readyz`` (``infra.health.HealthServer``)
when their ``METRICS_PORT`` is set; ``/readyz`` answers 200 when every readiness check passes
and 503 with the names of those that failed. ``stack up`` waits on it and ``stack status``
reports it, so a stack counts as up only when ``inference-node check`` would say so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra.dev.processes import log_tail

__all__ = ["Readiness", "probe", "wait_ready"]

_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Readiness:
    ready: bool
    failed: list[str] = field(default_factory=list)
    """The failing checks' names; ``unreachable (ConnectError)`` and the like when the
    endpoint did not answer."""


def probe(readyz_url: str, timeout_s: float = 2.0) -> Readiness:
    """GET ``readyz_url``: ready on 200, else the checks it names as failed."""
    try:
        response = httpx.get(readyz_url, timeout=timeout_s)
    except httpx.HTTPError as e:
        return Readiness(False, [f"unreachable ({type(e).__name__})"])
    if response.status_code == 200:
        return Readiness(True)
    try:
        failed = response.json().get("failed")
    except ValueError:
        failed = None
    if not isinstance(failed, list) or not failed:
        return Readiness(False, [f"http {response.status_code}"])
    return Readiness(False, [str(name) for name in failed])


def wait_ready(
    what: str,
    readyz_url: str,
    *,
    alive: Callable[[], bool],
    log_path: Path,
    timeout_s: float,
) -> None:
    """Poll ``readyz_url`` until it answers 200. ``RuntimeError`` (with the log's tail and
    the failing checks) when the process exits first or is not ready in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = probe(readyz_url)
        if state.ready:
            return
        if not alive():
            raise RuntimeError(
                f"{what} exited during start-up; end of {log_path}:\n{log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} not ready after {timeout_s} s ({readyz_url}: failing "
                f"{', '.join(state.failed)}); end of {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(_POLL_INTERVAL_S)
