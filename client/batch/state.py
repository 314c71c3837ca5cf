"""A batch job's state: one SQLite file (``state.sqlite3``) in the job directory.

What it records, so that a client killed at any moment can resume without a duplicate or a gap:

- ``job``: the input file's path, size and sha256 (a resume refuses another file), the job id
  (request ids are ``<job id>-<line>``), namespace and reply topic, the cancel flag;
- ``sessions``: each run's reply-topic end offsets *before* it sent anything, so a resumed run
  can read the replies that arrived while no client was listening;
- ``lines``: one row per line once it is sent (request id, when, by which session) or
  finished (outcome, reply, verification verdict, tokens). A row is marked sent, and
  committed, *before* its request is produced; a finished line is never sent again.

Durability: WAL with ``synchronous=FULL``, commits per chunk of lines (``mark_sent``) or per
flush of finished lines (``finish``); losing an uncommitted flush to a kill only means those
lines are looked up again on resume. Another process (``status``, ``cancel``) may read and
set the cancel flag while a run holds the job (WAL readers do not block the writer).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["STATE_FILE", "FinishedLine", "JobInfo", "JobState", "SentLine"]

STATE_FILE = "state.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS job (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY, started_unix_ms INTEGER NOT NULL, positions TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lines (
    line INTEGER PRIMARY KEY,
    custom_id TEXT,
    request_id TEXT,
    model TEXT,
    session INTEGER,
    created_unix_ms INTEGER,
    deadline_unix_ms INTEGER,
    outcome TEXT,
    code TEXT,
    message TEXT,
    reply TEXT,
    verified INTEGER,
    failed_checks TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    finished_unix_ms INTEGER
);
CREATE INDEX IF NOT EXISTS lines_open ON lines (outcome) WHERE outcome IS NULL;
"""


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    input_path: str
    input_bytes: int
    input_sha256: str
    total_lines: int
    namespace: str
    reply_to: str
    created_unix_ms: int


@dataclass(frozen=True)
class SentLine:
    """A line sent and not finished (as of the last commit)."""

    line: int
    custom_id: str
    request_id: str
    model: str
    session: int
    created_unix_ms: int
    deadline_unix_ms: int | None


@dataclass(frozen=True)
class FinishedLine:
    """A line's outcome: ``result`` (``reply`` holds the result, ``verified`` the verdict),
    ``error`` (``code``/``message`` of the typed error; ``reply`` the ErrorReply when one
    came), ``invalid_line`` or ``timeout``."""

    line: int
    custom_id: str | None
    outcome: str
    request_id: str | None = None
    model: str | None = None
    code: str | None = None
    message: str | None = None
    reply: str | None = None
    verified: bool | None = None
    failed_checks: tuple[str, ...] = ()
    input_tokens: int = 0
    output_tokens: int = 0
    created_unix_ms: int | None = None
    deadline_unix_ms: int | None = None


class JobState:
    """Lifecycle: ``create`` or ``open`` → calls → ``close``. One writer at a time (the run
    holding the job lock); any number of readers."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._info: JobInfo | None = None

    @classmethod
    def exists(cls, job_dir: Path) -> bool:
        return (job_dir / STATE_FILE).exists()

    @classmethod
    def create(
        cls,
        job_dir: Path,
        *,
        input_path: Path,
        input_bytes: int,
        input_sha256: str,
        total_lines: int,
        namespace: str,
        reply_to: str,
    ) -> JobState:
        job_dir.mkdir(parents=True, exist_ok=True)
        state = cls(_connect(job_dir / STATE_FILE))
        values = {
            "job_id": uuid.uuid4().hex[:16],
            "input_path": str(input_path),
            "input_bytes": str(input_bytes),
            "input_sha256": input_sha256,
            "total_lines": str(total_lines),
            "namespace": namespace,
            "reply_to": reply_to,
            "created_unix_ms": str(_now_ms()),
            "cancelled": "0",
        }
        with state._db:
            state._db.executemany("INSERT OR IGNORE INTO job VALUES (?, ?)", values.items())
        return state

    @classmethod
    def open(cls, job_dir: Path) -> JobState:
        path = job_dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no batch job in {job_dir} (no {STATE_FILE})")
        return cls(_connect(path))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the job ----------------------------------------------------------------------------

    def _job(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM job").fetchall())

    @property
    def info(self) -> JobInfo:
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def _read_info(self) -> JobInfo:
        job = self._job()
        return JobInfo(
            job_id=job["job_id"],
            input_path=job["input_path"],
            input_bytes=int(job["input_bytes"]),
            input_sha256=job["input_sha256"],
            total_lines=int(job["total_lines"]),
            namespace=job["namespace"],
            reply_to=job["reply_to"],
            created_unix_ms=int(job["created_unix_ms"]),
        )

    @property
    def cancelled(self) -> bool:
        """Read afresh each time: ``cancel`` sets it from another process."""
        row = self._db.execute("SELECT value FROM job WHERE key = 'cancelled'").fetchone()
        return row is not None and row[0] == "1"

    def mark_cancelled(self) -> None:
        with self._db:
            self._db.execute("UPDATE job SET value = '1' WHERE key = 'cancelled'")

    def request_id(self, line: int) -> str:
        return f"{self.info.job_id}-{line}"

    # -- sessions ---------------------------------------------------------------------------

    def begin_session(self, positions: dict[int, int]) -> int:
        """Record a run's reply-topic end offsets (partition -> offset) before it sends."""
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO sessions (started_unix_ms, positions) VALUES (?, ?)",
                (_now_ms(), json.dumps({str(p): o for p, o in positions.items()})),
            )
        return int(cursor.lastrowid or 0)

    def session_positions(self, session: int) -> dict[int, int] | None:
        row = self._db.execute("SELECT positions FROM sessions WHERE id = ?", (session,)).fetchone()
        if row is None:
            return None
        return {int(p): int(o) for p, o in json.loads(row[0]).items()}

    # -- lines ------------------------------------------------------------------------------

    def mark_sent(self, lines: Sequence[SentLine]) -> None:
        """Record (and commit) that these lines are about to be sent. A line recorded before
        (sent by an earlier run, or finished) keeps its row: a re-send is the same request."""
        with self._db:
            self._db.executemany(
                "INSERT INTO lines (line, custom_id, request_id, model, session, "
                "created_unix_ms, deadline_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (line) DO NOTHING",
                [
                    (
                        s.line,
                        s.custom_id,
                        s.request_id,
                        s.model,
                        s.session,
                        s.created_unix_ms,
                        s.deadline_unix_ms,
                    )
                    for s in lines
                ],
            )

    def finish(self, lines: Iterable[FinishedLine]) -> int:
        """Record outcomes in one transaction; a line already finished keeps its first
        outcome. Returns how many lines this call finished."""
        now = _now_ms()
        changed = 0
        with self._db:
            for f in lines:
                cursor = self._db.execute(
                    "INSERT INTO lines (line, custom_id, request_id, model, created_unix_ms, "
                    "deadline_unix_ms, outcome, code, message, reply, verified, failed_checks, "
                    "input_tokens, output_tokens, finished_unix_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (line) DO UPDATE SET outcome = excluded.outcome, "
                    "code = excluded.code, message = excluded.message, reply = excluded.reply, "
                    "verified = excluded.verified, failed_checks = excluded.failed_checks, "
                    "input_tokens = excluded.input_tokens, "
                    "output_tokens = excluded.output_tokens, "
                    "finished_unix_ms = excluded.finished_unix_ms, "
                    "created_unix_ms = coalesce(excluded.created_unix_ms, created_unix_ms), "
                    "deadline_unix_ms = coalesce(excluded.deadline_unix_ms, deadline_unix_ms) "
                    "WHERE outcome IS NULL",
                    (
                        f.line,
                        f.custom_id,
                        f.request_id,
                        f.model,
                        f.created_unix_ms,
                        f.deadline_unix_ms,
                        f.outcome,
                        f.code,
                        f.message,
                        f.reply,
                        None if f.verified is None else int(f.verified),
                        json.dumps(list(f.failed_checks)),
                        f.input_tokens,
                        f.output_tokens,
                        now,
                    ),
                )
                changed += cursor.rowcount
        return changed

    def finished_line_numbers(self) -> set[int]:
        rows = self._db.execute("SELECT line FROM lines WHERE outcome IS NOT NULL")
        return {int(r[0]) for r in rows}

    def open_lines(self) -> list[SentLine]:
        """Lines sent and not finished, in line order."""
        rows = self._db.execute(
            "SELECT line, custom_id, request_id, model, session, created_unix_ms, "
            "deadline_unix_ms FROM lines WHERE outcome IS NULL ORDER BY line"
        )
        return [SentLine(*row) for row in rows]

    def finished(self) -> Iterator[FinishedLine]:
        """Every finished line, in line order."""
        rows = self._db.execute(
            "SELECT line, custom_id, outcome, request_id, model, code, message, reply, verified, "
            "failed_checks, input_tokens, output_tokens, created_unix_ms, deadline_unix_ms "
            "FROM lines WHERE outcome IS NOT NULL ORDER BY line"
        )
        for row in rows:
            yield FinishedLine(
                line=row[0],
                custom_id=row[1],
                outcome=row[2],
                request_id=row[3],
                model=row[4],
                code=row[5],
                message=row[6],
                reply=row[7],
                verified=None if row[8] is None else bool(row[8]),
                failed_checks=tuple(json.loads(row[9] or "[]")),
                input_tokens=row[10],
                output_tokens=row[11],
                created_unix_ms=row[12],
                deadline_unix_ms=row[13],
            )

    def counts(self) -> dict[str, Any]:
        """Lines by outcome (errors by code), open (sent, unanswered) and not yet sent."""
        total = self.info.total_lines
        by_outcome: dict[str, int] = {}
        errors: dict[str, int] = {}
        for outcome, code, n in self._db.execute(
            "SELECT outcome, code, count(*) FROM lines WHERE outcome IS NOT NULL "
            "GROUP BY outcome, code"
        ):
            by_outcome[outcome] = by_outcome.get(outcome, 0) + n
            if outcome == "error":
                errors[code or "unknown"] = n
        open_ = self._db.execute("SELECT count(*) FROM lines WHERE outcome IS NULL").fetchone()[0]
        tokens = self._db.execute(
            "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), "
            "coalesce(sum(verified = 1), 0), coalesce(sum(verified = 0), 0) FROM lines"
        ).fetchone()
        finished = sum(by_outcome.values())
        return {
            "lines": total,
            "finished": finished,
            "in_flight": open_,
            "not_sent": total - finished - open_,
            "outcomes": by_outcome,
            "errors": errors,
            "verified": tokens[2],
            "not_verified": tokens[3],
            "tokens": {"input": tokens[0], "output": tokens[1]},
        }


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level="DEFERRED")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
