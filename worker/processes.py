"""``inference-node worker --processes N``: one pod, N worker processes.

One Python process signs, hashes, decodes and produces on one core; a pod with more cores runs
N workers that share the node's identity (the key files are created here, once, before any
child starts, so every child signs as the same node) and its consumer group, so Kafka spreads
the partitions over them. Each child is a plain ``inference-node worker``:

- its health server listens on ``METRICS_PORT + i`` (child 0 on the pod's probe port);
- the pod is ready (``--ready-file``) once every child is;
- SIGTERM/SIGINT is forwarded to every child (each drains and commits), and the parent
  exits once they have;
- a child that exits on its own takes the pod down: the others are stopped (draining) and the
  parent exits non-zero, so the orchestrator restarts the pod as a whole rather than running
  it with fewer processes than it was sized for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from infra.lifecycle import clear_ready, mark_ready
from worker.identity import chain_key, dlq_public_key, node_sealer, node_signer
from worker.settings import WorkerSettings

__all__ = ["run_processes"]

log = logging.getLogger(__name__)


def _child_env(settings: WorkerSettings, index: int) -> dict[str, str]:
    env = dict(os.environ)
    if settings.metrics_port is not None and settings.metrics_port != 0:
        env["OG_WORKER_METRICS_PORT"] = str(settings.metrics_port + index)
    return env


async def run_processes(settings: WorkerSettings, count: int, ready_file: Path | None) -> int:
    """Run ``count`` worker processes until stopped; their exit status, 0 when all drained
    cleanly after a stop signal."""
    node_id = node_signer(settings).node_id  # every identity file exists before any child
    node_sealer(settings)
    chain_key(settings)
    dlq_public_key(settings)
    ready = [
        None if ready_file is None else ready_file.with_name(f"{ready_file.name}.{i}")
        for i in range(count)
    ]
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nodecli.main",
            "worker",
            *(["--ready-file", str(path)] if path is not None else []),
            stdin=asyncio.subprocess.DEVNULL,
            env=_child_env(settings, i),
        )
        for i, path in enumerate(ready)
    ]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    waits = {asyncio.create_task(child.wait()): child for child in children}
    marker = asyncio.create_task(_mark_ready(ready, ready_file, node_id))
    stop = asyncio.create_task(stopping.wait())
    try:
        done, _ = await asyncio.wait([*waits, stop], return_when=asyncio.FIRST_COMPLETED)
        if stop not in done:
            log.error("a worker process exited; stopping the others")
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(child.wait() for child in children))
    finally:
        marker.cancel()
        stop.cancel()
        await clear_ready(ready_file)
    failed = [code for code in codes if code != 0]
    if not stopping.is_set():
        return failed[0] if failed else 1  # a child ended without being asked to
    return failed[0] if failed else 0


async def _mark_ready(ready: list[Path | None], ready_file: Path | None, node_id: str) -> None:
    """The pod's ready file, once every child wrote its own (they poll nothing else)."""
    if ready_file is None:
        return

    def every_child_ready() -> bool:
        return all(path is not None and path.exists() for path in ready)

    while True:  # files other processes write: there is no event to wait on
        if await asyncio.to_thread(every_child_ready):
            break
        await asyncio.sleep(0.1)
    await mark_ready(ready_file, node_id)
