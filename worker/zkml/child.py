"""EZKL in a child process: ``python -m worker.zkml.child JOB.json RESULT.json``.

Why a process per job rather than a thread or a process pool:

- EZKL's Python binding holds the GIL for a whole call (a proof: seconds), so a thread would
  freeze the worker's event loop; measured: one 7.5 s proof, one 7.2 s stall.
- ``ezkl.prove`` can hang for good on a witness whose lookups fall outside the calibrated
  range (seen with 23.0.5). A process can be killed at its deadline; a pool's worker cannot,
  short of breaking the whole pool.
- The proving key (up to hundreds of MB) is read per proof anyway, and a process returns its
  memory to the system when it exits.

A job and its result are JSON files in a private scratch directory. The child's stdout and
stderr are discarded (EZKL prints calibration tables there); failures come back as a
category, never as text that could quote request tensors.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from infra.children import run_python_module

__all__ = ["ChildFailed", "ChildTimeout", "main", "run_child"]


class ChildFailed(Exception):
    """The child exited without a result (crash, killed for memory)."""


class ChildTimeout(ChildFailed):
    """The child ran past its deadline and was killed."""


async def run_child(
    job: dict[str, Any],
    scratch: Path,
    *,
    timeout_s: float,
    threads: int | None = None,
    niceness: int = 0,
) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter; return its result object. Cancelling the awaiting
    task kills the child."""
    job_path, result_path = scratch / "job.json", scratch / "result.json"
    await asyncio.to_thread(job_path.write_text, json.dumps({**job, "niceness": niceness}))
    env = dict(os.environ)
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    try:
        status = await run_python_module(
            "worker.zkml.child", [str(job_path), str(result_path)], timeout_s=timeout_s, env=env
        )
    except TimeoutError:
        raise ChildTimeout(f"{job['kind']} ran past {timeout_s} s") from None
    try:
        result: dict[str, Any] = json.loads(await asyncio.to_thread(result_path.read_bytes))
    except (OSError, ValueError):
        raise ChildFailed(f"{job['kind']} exited {status} without a result") from None
    return result


def _prepare(job: dict[str, Any]) -> dict[str, Any]:
    from worker.zkml.artifacts import PrepareError, prepare_circuit
    from worker.zkml.settings import CircuitOptions
    from worker.zkml.srs import DevSrs, SrsFile

    srs = job["srs"]
    try:
        _, reused = prepare_circuit(
            Path(job["model_path"]),
            model_id=job["model_id"],
            model_digest=job["model_digest"],
            options=CircuitOptions.model_validate(job["options"]),
            root=Path(job["root"]),
            srs=DevSrs() if srs is None else SrsFile(Path(srs["path"]), srs["label"]),
            lock_timeout_s=job["lock_timeout_s"],
        )
    except PrepareError as e:  # no request data at preparation: the message is safe
        return {"ok": False, "error": "prepare_failed", "detail": str(e)[:500]}
    return {"ok": True, "reused": reused}


def _prove(job: dict[str, Any]) -> dict[str, Any]:
    from worker.zkml.artifacts import load_ezkl

    ezkl = load_ezkl()
    witness_path = job["witness"]
    try:
        witness = ezkl.gen_witness(job["data"], job["compiled"], witness_path, None, None)
    except RuntimeError:
        return {"ok": False, "error": "witness_failed"}
    low, high = job["lookup_range"]
    if witness["min_lookup_inputs"] < low or witness["max_lookup_inputs"] > high:
        # Proving such a witness can hang (see module doc): refuse before trying.
        return {"ok": False, "error": "out_of_range"}
    try:
        ezkl.mock(witness_path, job["compiled"])
    except RuntimeError:
        return {"ok": False, "error": "out_of_range"}
    try:
        ezkl.prove(witness_path, job["compiled"], job["pk"], job["proof"], job["srs"])
    except RuntimeError:
        return {"ok": False, "error": "prover_failed"}
    return {"ok": True}


def main(argv: list[str]) -> int:
    job_path, result_path = Path(argv[1]), Path(argv[2])
    job = json.loads(job_path.read_bytes())
    if job.get("niceness"):
        os.nice(int(job["niceness"]))
    handlers = {"prepare": _prepare, "prove": _prove}
    result = handlers[job["kind"]](job)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
