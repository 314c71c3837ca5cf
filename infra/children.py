"""Child interpreters for work that must not share the service's process.

EZKL proving and SNARK verification hold the GIL for seconds and may hang inside native code,
so the worker and settlement run them as ``python -m <module>`` children that can be killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

__all__ = ["run_python_module"]

_IMPORT_ROOT = str(Path(__file__).resolve().parents[1])  # the directory holding infra/


async def run_python_module(
    module: str, args: list[str], *, timeout_s: float, env: dict[str, str] | None = None
) -> int:
    """Run ``python -m module args`` in a fresh interpreter (our packages importable, no
    stdio) and return its exit status. Past ``timeout_s`` the child is killed and
    ``TimeoutError`` raised; cancelling the awaiting task kills it too. For work that must not
    share this process (it holds the GIL for seconds, or may hang inside native code)."""
    child_env = dict(os.environ if env is None else env)
    path = child_env.get("PYTHONPATH")
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_IMPORT_ROOT, path) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=child_env,
    )
    try:
        async with asyncio.timeout(timeout_s):
            return await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
