"""A batch job's SQLite state: what was sent, what was finished, sessions, the cancel flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.batch.state import STATE_FILE, FinishedLine, JobState, SentLine


def _create(job_dir: Path, total: int = 5) -> JobState:
    return JobState.create(
        job_dir,
        input_path=job_dir / "in.jsonl",
        input_bytes=123,
        input_sha256="ab" * 32,
        total_lines=total,
        namespace="og",
        reply_to="og.replies",
    )


def _sent(line: int, session: int, created: int = 1000) -> SentLine:
    return SentLine(line, f"c{line}", f"job-{line}", "demo-mlp", session, created, None)


def test_a_new_job_records_its_input_and_a_job_id(tmp_path: Path) -> None:
    with _create(tmp_path / "job") as state:
        info = state.info
        assert (info.total_lines, info.input_bytes, info.namespace) == (5, 123, "og")
        assert len(info.job_id) == 16
        assert state.request_id(7) == f"{info.job_id}-7"
    with JobState.open(tmp_path / "job") as again:
        assert again.info == info
    with pytest.raises(FileNotFoundError):
        JobState.open(tmp_path / "elsewhere")


def test_sent_lines_stay_open_until_finished_and_finish_once(tmp_path: Path) -> None:
    state = _create(tmp_path)
    session = state.begin_session({0: 10, 1: 4})
    state.mark_sent([_sent(1, session), _sent(2, session)])
    assert [s.line for s in state.open_lines()] == [1, 2]
    result = FinishedLine(1, "c1", "result", "job-1", "demo-mlp", reply="{}", verified=True)
    assert state.finish([result]) == 1
    # A second outcome for the same line (a late duplicate) is ignored.
    late = FinishedLine(1, "c1", "timeout", "job-1", "demo-mlp", code="timeout")
    assert state.finish([late]) == 0
    assert [f.outcome for f in state.finished()] == ["result"]
    assert [s.line for s in state.open_lines()] == [2]
    assert state.finished_line_numbers() == {1}


def test_a_resent_line_keeps_its_first_session_and_times(tmp_path: Path) -> None:
    state = _create(tmp_path)
    first = state.begin_session({0: 3})
    state.mark_sent([_sent(4, first, created=111)])
    second = state.begin_session({0: 9})
    state.mark_sent([_sent(4, second, created=222)])
    (row,) = state.open_lines()
    assert (row.session, row.created_unix_ms) == (first, 111)
    assert state.session_positions(first) == {0: 3}
    assert state.session_positions(second) == {0: 9}
    assert state.session_positions(99) is None


def test_invalid_lines_are_finished_without_being_sent(tmp_path: Path) -> None:
    state = _create(tmp_path)
    bad = FinishedLine(3, None, "invalid_line", code="invalid_line", message="line 3: empty line")
    assert state.finish([bad]) == 1
    (row,) = state.finished()
    assert (row.line, row.request_id, row.message) == (3, None, "line 3: empty line")


def test_counts_by_outcome_errors_and_tokens(tmp_path: Path) -> None:
    state = _create(tmp_path, total=6)
    session = state.begin_session({})
    state.mark_sent([_sent(n, session) for n in (1, 2, 3, 4)])
    state.finish(
        [
            FinishedLine(
                1, "c1", "result", "job-1", verified=True, input_tokens=5, output_tokens=2
            ),
            FinishedLine(2, "c2", "result", "job-2", verified=False, failed_checks=("signature",)),
            FinishedLine(3, "c3", "error", "job-3", code="bad_request", message="m"),
            FinishedLine(5, None, "invalid_line", code="invalid_line", message="r"),
        ]
    )
    counts = state.counts()
    assert counts["outcomes"] == {"result": 2, "error": 1, "invalid_line": 1}
    assert counts["errors"] == {"bad_request": 1}
    assert (counts["finished"], counts["in_flight"], counts["not_sent"]) == (4, 1, 1)
    assert (counts["verified"], counts["not_verified"]) == (1, 1)
    assert counts["tokens"] == {"input": 5, "output": 2}
    failed = next(f for f in state.finished() if f.line == 2)
    assert failed.failed_checks == ("signature",)


def test_what_was_committed_survives_a_process_that_never_closed(tmp_path: Path) -> None:
    state = _create(tmp_path)
    session = state.begin_session({0: 1})
    state.mark_sent([_sent(1, session)])
    state.finish([FinishedLine(1, "c1", "result", "job-1", verified=True)])
    # No close (a SIGKILL): a second connection sees every commit.
    with JobState.open(tmp_path) as reader:
        assert reader.finished_line_numbers() == {1}
    assert (tmp_path / STATE_FILE).exists()


def test_the_cancel_flag_is_seen_by_another_connection(tmp_path: Path) -> None:
    runner = _create(tmp_path)
    assert not runner.cancelled
    with JobState.open(tmp_path) as other:
        other.mark_cancelled()
    assert runner.cancelled
