"""``inference-node stack up|down|status``: the local development stack.

Everything runs as detached processes tracked by pid files under the state directory (default
``var/``): the Tansu broker, one worker and the settlement service; logs go to ``var/log``.
``up`` is idempotent: a component already running is left alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.broker import BrokerAlreadyRunning, kafka_api_versions_ok, start_broker, stop_broker
from infra.processes import running_pid, stop_pidfile
from infra.topics import ensure_topics, standard_topics
from worker.models.demo import build_demo_hub

__all__ = ["StackConfig", "stack_down", "stack_status", "stack_up"]

DEMO_MODELS = ("demo-mlp", "demo-lm")
_SERVICES = ("worker", "settlement")
_MARKER = b"nodecli"


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path = Path("var")
    host: str = "127.0.0.1"
    port: int = 9092
    namespace: str = "og"
    ready_timeout_s: float = 120.0

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def path(self, *parts: str) -> Path:
        return self.state_dir.joinpath(*parts)


def _service_env(cfg: StackConfig, service: str) -> dict[str, str]:
    prefix = "OG_WORKER_" if service == "worker" else "OG_SETTLEMENT_"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OG_WORKER_", "OG_SETTLEMENT_"))
    }
    env |= {
        prefix + "KAFKA__BOOTSTRAP_SERVERS": cfg.bootstrap,
        prefix + "NAMESPACE": cfg.namespace,
    }
    if service == "worker":
        env |= {
            "OG_WORKER_MODELS": json.dumps(list(DEMO_MODELS)),
            "OG_WORKER_HUB_DIR": str(cfg.path("hub")),
            "OG_WORKER_CACHE_DIR": str(cfg.path("cache")),
            "OG_WORKER_KEY_DIR": str(cfg.path("keys")),
        }
    else:
        env["OG_SETTLEMENT_LEDGER_PATH"] = str(cfg.path("settlement", "ledger.sqlite3"))
    return env


def _start_service(cfg: StackConfig, service: str) -> None:
    pid_path = cfg.path("run", f"{service}.pid")
    if running_pid(pid_path, _MARKER) is not None:
        return
    ready = cfg.path("run", f"{service}.ready")
    ready.unlink(missing_ok=True)
    log_path = cfg.path("log", f"{service}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "nodecli.main", service, "--ready-file", str(ready)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_service_env(cfg, service),
            start_new_session=True,
        )
    pid_path.write_text(f"{proc.pid}\n")


def _wait_ready(cfg: StackConfig, service: str) -> None:
    deadline = time.monotonic() + cfg.ready_timeout_s
    ready = cfg.path("run", f"{service}.ready")
    pid_path = cfg.path("run", f"{service}.pid")
    while not ready.exists():
        if running_pid(pid_path, _MARKER) is None:
            raise RuntimeError(
                f"{service} exited during start-up; see {cfg.path('log', service)}.log"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service} not ready after {cfg.ready_timeout_s} s")
        time.sleep(0.1)


def stack_up(cfg: StackConfig) -> dict[str, object]:
    """Start broker, topics, demo models, worker and settlement; return the status."""
    try:
        start_broker(
            cfg.host,
            cfg.port,
            log_path=cfg.path("log", "broker.log"),
            pid_path=cfg.path("run", "broker.pid"),
            detach=True,
        )
    except BrokerAlreadyRunning:
        pass
    build_demo_hub(cfg.path("hub"))
    asyncio.run(ensure_topics(cfg.bootstrap, standard_topics(cfg.namespace, DEMO_MODELS)))
    for service in _SERVICES:
        _start_service(cfg, service)
    for service in _SERVICES:
        _wait_ready(cfg, service)
    return stack_status(cfg)


def stack_down(cfg: StackConfig) -> dict[str, bool]:
    """Stop services first (they drain and commit), then the broker."""
    stopped = {
        service: stop_pidfile(cfg.path("run", f"{service}.pid"), marker=_MARKER, timeout_s=30.0)
        for service in _SERVICES
    }
    stopped["broker"] = stop_broker(cfg.path("run", "broker.pid"))
    return stopped


def stack_status(cfg: StackConfig) -> dict[str, object]:
    status: dict[str, object] = {
        "bootstrap": cfg.bootstrap,
        "namespace": cfg.namespace,
        "broker": {"ready": kafka_api_versions_ok(cfg.host, cfg.port)},
    }
    for service in _SERVICES:
        pid = running_pid(cfg.path("run", f"{service}.pid"), _MARKER)
        status[service] = {
            "pid": pid,
            "running": pid is not None,
            "ready": pid is not None and cfg.path("run", f"{service}.ready").exists(),
        }
    return status
