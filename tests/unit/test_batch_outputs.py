"""Output files of a batch job (input order, one line per input line, failures verbatim) and
the progress display."""

from __future__ import annotations

import io
import json
from pathlib import Path

from client.batch.outputs import FAILURES_FILE, OUTPUT_FILE, write_outputs
from client.batch.progress import Progress, format_duration
from client.batch.state import FinishedLine, JobState, SentLine

ML = {"kind": "ml", "tensors": {"x": {"dtype": "float32", "shape": [1, 1], "data": [1.5]}}}


def _input(tmp_path: Path) -> tuple[Path, list[bytes]]:
    lines = [
        json.dumps({"custom_id": "a", "model": "demo-mlp", "body": ML}).encode(),
        b"not json",
        json.dumps({"custom_id": "c", "model": "demo-mlp", "body": ML}).encode(),
        json.dumps({"custom_id": "d", "model": "demo-mlp", "body": ML}).encode(),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, lines


def _state(tmp_path: Path, total: int) -> JobState:
    return JobState.create(
        tmp_path / "job",
        input_path=tmp_path / "in.jsonl",
        input_bytes=0,
        input_sha256="00" * 32,
        total_lines=total,
        namespace="og",
        reply_to="og.replies",
    )


def test_outputs_hold_one_line_per_input_line_in_order(tmp_path: Path) -> None:
    path, raw = _input(tmp_path)
    state = _state(tmp_path, len(raw))
    job = state.info.job_id
    session = state.begin_session({})
    state.mark_sent(
        [
            SentLine(n, c, f"{job}-{n}", "demo-mlp", session, 1000, 2000)
            for n, c in [(1, "a"), (3, "c")]
        ]
    )
    reply = {"type": "result", "request_id": f"{job}-1", "output": {"kind": "ml"}}
    state.finish(
        [
            FinishedLine(3, "c", "timeout", f"{job}-3", "demo-mlp", code="timeout", message="t"),
            FinishedLine(2, None, "invalid_line", code="invalid_line", message="line 2: bad"),
            FinishedLine(
                1, "a", "result", f"{job}-1", "demo-mlp", reply=json.dumps(reply), verified=True
            ),
        ]
    )
    state.mark_cancelled()
    counts = write_outputs(state, path, tmp_path / "job")
    assert (counts.lines, counts.failures, counts.cancelled) == (4, 3, 1)

    out = [json.loads(line) for line in (tmp_path / "job" / OUTPUT_FILE).read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    assert [o["outcome"] for o in out] == ["result", "invalid_line", "timeout", "cancelled"]
    assert [o["custom_id"] for o in out] == ["a", None, "c", "d"]
    first = out[0]
    assert first["response"] == reply and first["error"] is None
    assert first["verification"] == {"verified": True, "failed_checks": []}
    request = first["request"]
    assert request["request_id"] == f"{job}-1" and request["payload"] == ML
    assert (request["created_unix_ms"], request["deadline_unix_ms"]) == (1000, 2000)
    assert request["reply_to"] == "og.replies"
    assert out[1]["error"] == {"code": "invalid_line", "message": "line 2: bad", "retryable": False}
    assert out[2]["error"]["retryable"] is True
    assert out[3]["error"]["code"] == "cancelled" and out[3]["request_id"] == f"{job}-4"
    # Failures are the input lines themselves, verbatim, ready to be submitted again.
    assert (tmp_path / "job" / FAILURES_FILE).read_bytes().splitlines() == raw[1:]


def test_requests_can_be_left_out(tmp_path: Path) -> None:
    path, raw = _input(tmp_path)
    state = _state(tmp_path, len(raw))
    write_outputs(state, path, tmp_path / "job", include_requests=False)
    lines = (tmp_path / "job" / OUTPUT_FILE).read_text().splitlines()
    assert len(lines) == 4 and all("request" not in json.loads(line) for line in lines)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_lines_carry_counts_rate_and_eta() -> None:
    clock, stream = _Clock(), io.StringIO()
    progress = Progress(1000, 100, stream, tty=False, clock=clock)
    clock.now += 10
    progress.advance(200)  # 200 in 10 s: 20/s, 700 left: 35 s
    assert stream.getvalue() == "batch: 300/1000 (30%) 20.0/s ETA 35s, 10s elapsed\n"
    progress.advance()  # within the interval: nothing printed
    assert stream.getvalue().count("\n") == 1


def test_the_terminal_bar_redraws_one_line() -> None:
    clock, stream = _Clock(), io.StringIO()
    progress = Progress(10, 0, stream, tty=True, clock=clock)
    clock.now += 1
    progress.advance(5)
    progress.finish()
    text = stream.getvalue()
    assert text.startswith("\r\x1b[2K[") and "5/10 (50%) 5.0/s ETA 1s" in text
    assert text.endswith("\n") and text.count("\n") == 1
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"
