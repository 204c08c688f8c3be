"""Progress lines with an ETA for every long training command (prepare, train, analyze, ...).

    progress = Progress(len(files), "prepare")
    for f in files:
        ...
        progress.update(file=f.name)            # one unit done; fields are shown as key=value
    progress.close()

Lines go to stderr. On a terminal one line is redrawn in place a few times a second; otherwise
(a log file, a pipe, CI) a full line is printed at most every `interval` seconds, plus the first
update and the final summary, so logs stay short however many steps a run takes.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """`75` -> `1:15`, `3725` -> `1:02:05`; `--:--` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Counts units of work out of `total` and reports rate, elapsed time and ETA on stderr.

    `total` may be None (unknown): no percentage or ETA is shown then. The ETA is the remaining
    units at the average rate since the first update, which is stable for steady work (files,
    training steps) and not thrown off by a slow start.
    Usable as a context manager; `close()` prints the final line once (idempotent)."""

    def __init__(self, total: int | None, label: str, *, unit: str = "it",
                 interval: float | None = None, stream: TextIO | None = None) -> None:
        self.total = total if total is None else max(0, int(total))
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.is_tty else 5.0)
        self.count = 0
        self.fields: dict[str, Any] = {}
        self._start = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, count) at the first update
        self._last_print = -math.inf
        self._line_open = False
        self._closed = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def eta(self) -> float:
        """Seconds left at the average rate since the first update (nan when unknown).

        Counting from the first update leaves start-up costs (imports, a first step that
        compiles or warms caches) out of the rate; before a second update there is nothing
        else to go on, so the rate since construction is used."""
        if self.total is None or self.count <= 0:
            return math.nan
        remaining = max(0, self.total - self.count)
        if self._first is not None and self.count > self._first[1]:
            since, done = time.monotonic() - self._first[0], self.count - self._first[1]
        else:
            since, done = self.elapsed, self.count
        return remaining * since / done

    def update(self, n: int = 1, **fields: Any) -> None:
        """`n` more units done; `fields` (e.g. `loss=0.12, file="kick.wav"`) replace the shown ones."""
        self.count += n
        if self._first is None:
            self._first = (time.monotonic(), self.count)
        if fields:
            self.fields.update(fields)
        now = time.monotonic()
        first = self._last_print == -math.inf
        done = self.total is not None and self.count >= self.total
        if first or now - self._last_print >= self.interval or (done and self.is_tty):
            self._print(self._line())
            self._last_print = now

    def log(self, message: str) -> None:
        """Print a message on its own line without garbling the progress line."""
        self._end_line()
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Print the final line (total done, elapsed, rate)."""
        if self._closed:
            return
        self._closed = True
        elapsed = self.elapsed
        rate = self.count / elapsed if elapsed > 0 else math.inf
        line = (f"{self.label}: {self.count}"
                + (f"/{self.total}" if self.total is not None else "")
                + f" {self.unit} in {format_duration(elapsed)} ({_rate(rate, self.unit)})"
                + self._fields_text())
        self._print(line, final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = self.elapsed
        rate = self.count / elapsed if elapsed > 0 else math.inf
        if self.total:
            pct = 100.0 * self.count / self.total
            head = f"{self.label}: {self.count}/{self.total} ({pct:3.0f}%)"
            tail = f" {format_duration(elapsed)} elapsed, ETA {format_duration(self.eta())}"
        else:
            head = f"{self.label}: {self.count} {self.unit}"
            tail = f" {format_duration(elapsed)} elapsed"
        return f"{head} {_rate(rate, self.unit)}{tail}{self._fields_text()}"

    def _fields_text(self) -> str:
        if not self.fields:
            return ""
        return "  " + " ".join(f"{k}={_format_value(v)}" for k, v in self.fields.items())

    def _print(self, line: str, final: bool = False) -> None:
        if self.is_tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
            self._line_open = not final
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False


def _rate(rate: float, unit: str) -> str:
    if not math.isfinite(rate):
        return f"-- {unit}/s"
    if rate >= 1.0 or rate == 0.0:
        return f"{rate:.3g} {unit}/s"
    return f"{1.0 / rate:.3g} s/{unit}"
