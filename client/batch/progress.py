"""Progress of a batch run on stderr: a one-line bar on a terminal, plain lines otherwise.

Only counts, rates and times are printed, never a prompt or an output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration"]

_BAR_WIDTH = 28
_TTY_INTERVAL_S = 0.2
_PLAIN_INTERVAL_S = 5.0


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` / ``7s``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    if minutes:
        return f"{minutes}:{secs:02d}"
    return f"{secs}s"


class Progress:
    """Counts lines finished in this run against the lines left when it started; the rate is
    over this run, so the ETA does not count lines finished by an earlier run."""

    def __init__(
        self,
        total: int,
        already_done: int,
        stream: TextIO | None,
        *,
        tty: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = already_done
        self._start_done = already_done
        self._stream = stream
        self._tty = tty
        self._clock = clock
        self._started = clock()
        self._last = float("-inf")
        self._interval_s = _TTY_INTERVAL_S if tty else _PLAIN_INTERVAL_S

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self._interval_s:
            self._last = now
            self._write(self.render(now))

    @property
    def rate_per_s(self) -> float:
        elapsed_s = self._clock() - self._started
        return (self.done - self._start_done) / elapsed_s if elapsed_s > 0 else 0.0

    def render(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        elapsed_s = now - self._started
        rate = (self.done - self._start_done) / elapsed_s if elapsed_s > 0 else 0.0
        left = self.total - self.done
        eta = format_duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        counts = f"{self.done}/{self.total} ({pct:.0f}%) {rate:.1f}/s ETA {eta}"
        if not self._tty:
            return f"batch: {counts}, {format_duration(elapsed_s)} elapsed"
        filled = int(_BAR_WIDTH * self.done / self.total) if self.total else _BAR_WIDTH
        return f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {counts}"

    def finish(self) -> None:
        self._write(self.render())
        if self._tty and self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()

    def _write(self, text: str) -> None:
        if self._stream is None:
            return
        if self._tty:
            self._stream.write("\r\x1b[2K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
