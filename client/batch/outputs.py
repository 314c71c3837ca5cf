"""A batch job's output files, written from its state in input order.

- ``output.jsonl``: one line per input line, in input order::

    {"line": 7, "custom_id": "q-7", "request_id": "<job>-7", "model": "demo-mlp",
     "outcome": "result" | "error" | "invalid_line" | "timeout" | "cancelled",
     "response": {...signed result...} | null,
     "error": {"code", "message", "retryable"} | null,
     "verification": {"verified": true, "failed_checks": []} | null,
     "request": {...the request as sent...} | null}

  ``response`` and ``request`` are what ``inference-node verify RESPONSE --request REQUEST``
  takes. ``request`` is rebuilt from the input line, the request id and the times recorded
  when it was sent (``include_requests=False`` leaves it out).
- ``failures.jsonl``: the input lines, verbatim, of every line that has no verified result:
  a batch input file for re-submission (fix invalid lines first).

Both are written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.batch.lines import BatchLine, iter_raw_lines, parse_line
from client.batch.state import FinishedLine, JobState
from schemas.base import VerificationMode
from schemas.requests import InferenceRequest

__all__ = [
    "FAILURES_FILE",
    "OUTPUT_FILE",
    "OutputCounts",
    "output_line",
    "rebuild_request",
    "write_outputs",
]

OUTPUT_FILE = "output.jsonl"
FAILURES_FILE = "failures.jsonl"
_RETRYABLE_OUTCOMES = frozenset({"timeout", "cancelled"})


@dataclass(frozen=True)
class OutputCounts:
    lines: int
    failures: int
    cancelled: int


def rebuild_request(line: BatchLine, f: FinishedLine, reply_to: str) -> InferenceRequest | None:
    """The request as it was sent (same id, payload and times), or None if never sent."""
    if f.request_id is None or f.model is None or f.created_unix_ms is None:
        return None
    return InferenceRequest(
        request_id=f.request_id,
        model=f.model,
        mode=VerificationMode.VANILLA,
        reply_to=reply_to,
        created_unix_ms=f.created_unix_ms,
        deadline_unix_ms=f.deadline_unix_ms,
        payload=line.payload,
    )


def output_line(
    f: FinishedLine, request: InferenceRequest | None, *, include_request: bool
) -> dict[str, Any]:
    """The output line of one finished line."""
    out: dict[str, Any] = {
        "line": f.line,
        "custom_id": f.custom_id,
        "request_id": f.request_id,
        "model": f.model,
        "outcome": f.outcome,
        "response": None,
        "error": None,
        "verification": None,
    }
    if f.outcome == "result" and f.reply is not None:
        out["response"] = json.loads(f.reply)
        out["verification"] = {
            "verified": bool(f.verified),
            "failed_checks": list(f.failed_checks),
        }
    else:
        retryable = f.outcome in _RETRYABLE_OUTCOMES
        if f.reply is not None:
            retryable = bool(json.loads(f.reply).get("retryable", False))
        out["error"] = {
            "code": f.code or f.outcome,
            "message": f.message or "",
            "retryable": retryable,
        }
    if include_request:
        out["request"] = None if request is None else request.model_dump(mode="json")
    return out


def _cancelled(number: int, raw: bytes, state: JobState) -> FinishedLine:
    parsed = parse_line(number, raw)
    return FinishedLine(
        line=number,
        custom_id=parsed.custom_id,
        outcome="cancelled",
        request_id=state.request_id(number),
        model=parsed.model if isinstance(parsed, BatchLine) else None,
        code="cancelled",
        message="the job was cancelled before this line was answered",
    )


def _joined(state: JobState, input_path: Path) -> Iterator[tuple[int, bytes, FinishedLine | None]]:
    finished = state.finished()
    pending = next(finished, None)
    for number, raw in iter_raw_lines(input_path):
        if pending is not None and pending.line == number:
            yield number, raw, pending
            pending = next(finished, None)
        else:
            yield number, raw, None


def write_outputs(
    state: JobState, input_path: Path, out_dir: Path, *, include_requests: bool = True
) -> OutputCounts:
    """Write ``output.jsonl`` and ``failures.jsonl``. A line without an outcome is written as
    ``cancelled`` (call this for an unfinished job only once it is cancelled)."""
    reply_to = state.info.reply_to
    lines = failures = cancelled = 0
    out_tmp, fail_tmp = out_dir / f".{OUTPUT_FILE}.tmp", out_dir / f".{FAILURES_FILE}.tmp"
    with out_tmp.open("w", encoding="utf-8") as out, fail_tmp.open("wb") as fail:
        for number, raw, finished in _joined(state, input_path):
            f = finished if finished is not None else _cancelled(number, raw, state)
            cancelled += finished is None
            request = None
            if f.request_id is not None and (include_requests and f.outcome == "result"):
                parsed = parse_line(number, raw)
                if isinstance(parsed, BatchLine):
                    request = rebuild_request(parsed, f, reply_to)
            line = output_line(f, request, include_request=include_requests)
            out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
            lines += 1
            if not (f.outcome == "result" and f.verified):
                fail.write(raw + b"\n")
                failures += 1
        out.flush()
        os.fsync(out.fileno())
        fail.flush()
        os.fsync(fail.fileno())
    out_tmp.replace(out_dir / OUTPUT_FILE)
    fail_tmp.replace(out_dir / FAILURES_FILE)
    return OutputCounts(lines=lines, failures=failures, cancelled=cancelled)
