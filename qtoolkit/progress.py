"""Progress bars for every long stage, drawn by rich on standard error, and plain lines in a log.

On a terminal one `rich.progress.Progress` display is shared by every bar that is open at the same time, so that bars
nest (sampling's batches, and each batch's denoising steps below them) instead of fighting over the
terminal: the display starts with the first bar and stops when the last one closes. Bars opened with
`transient=True` vanish when they close (inner loops); the others stay as a record of what ran.

When the output goes to a file or a pipe (`make demo > log`, CI) a live bar cannot be drawn there, and rich
would show a bar only once it has finished; so each bar also writes plain lines to the log, at a steady pace:
one at every tenth of its total and at least every LOG_INTERVAL_S seconds (stage, done/total, elapsed, ETA),
and one when it closes. The lines go to standard output when it is not a terminal, else to standard error when
that is not one; inner bars (transient) write only the timed lines, so that a slow inner loop still shows life.

    with progress_bar(total, "calibration ndtc", unit="step") as bar:
        bar.advance()
    for batch in track(batches, "calibrate", unit="batch"):
        ...
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TextIO, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

T = TypeVar("T")

LOG_INTERVAL_S = 30.0  # the longest a stage stays silent in a log
LOG_LINES = 10  # a log line at every tenth of a bar's total

_display: Progress | None = None
_open_bars = 0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class LogLines:
    """A bar's plain lines in a log: stage, done/total, elapsed and ETA, at a steady pace."""

    def __init__(self, stream: TextIO, description: str, total: float | None, unit: str, completed: float,
                 transient: bool) -> None:
        self.stream, self.description, self.total, self.unit = stream, description, total, unit
        self.done, self.transient = completed, transient
        self.start = self.last_line = time.monotonic()
        self.next_line = self._lines_due() + 1  # in tenths of the total, counted exactly (no float drift)

    def _lines_due(self) -> int:
        return int(self.done * LOG_LINES // self.total) if self.total else 0

    def advance(self, steps: float) -> None:
        self.done += steps
        now = time.monotonic()
        crossed = not self.transient and self._lines_due() >= self.next_line and self.done < (self.total or 0)
        if crossed or now - self.last_line >= LOG_INTERVAL_S:
            self.write(now)
            self.next_line = self._lines_due() + 1

    def write(self, now: float, closing: bool = False) -> None:
        elapsed = now - self.start
        count = f"{self.done:g}/{self.total:g}" if self.total else f"{self.done:g}"
        if closing:
            timing = f"done in {_duration(elapsed)}"
        elif self.total and self.done:
            timing = f"{_duration(elapsed)} elapsed, eta {_duration(elapsed * (self.total - self.done) / self.done)}"
        else:
            timing = f"{_duration(elapsed)} elapsed"
        print(f"{self.description}: {count}{' ' + self.unit if self.unit else ''}, {timing}", file=self.stream,
              flush=True)
        self.last_line = now

    def close(self) -> None:
        if not self.transient:
            self.write(time.monotonic(), closing=True)


def log_stream() -> TextIO | None:
    """Where plain progress lines go: standard output when it is redirected, else standard error when that is."""
    if not sys.stdout.isatty():
        return sys.stdout
    return None if sys.stderr.isatty() else sys.stderr


class Bar:
    """One task of the shared display, and its lines in a log; a disabled bar accepts the same calls and shows
    nothing."""

    def __init__(self, task: TaskID | None, log: LogLines | None = None) -> None:
        self._task, self._log = task, log

    def advance(self, steps: float = 1) -> None:
        if self._task is not None:
            _display.advance(self._task, steps)
        if self._log is not None:
            self._log.advance(steps)

    def update(self, *, description: str | None = None, total: float | None = None) -> None:
        if self._task is not None:
            _display.update(self._task, description=description, total=total)
        if self._log is not None:
            self._log.description = description if description is not None else self._log.description
            self._log.total = total if total is not None else self._log.total


def _new_display() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=Console(stderr=True))


@contextmanager
def progress_bar(total: float | None, description: str, *, unit: str = "", completed: float = 0,
                 transient: bool = False, disable: bool = False) -> Iterator[Bar]:
    """A bar of `total` steps (None: unknown) labelled `description`, open for the `with` block: live on a
    terminal, as plain lines in a log (module docstring)."""
    global _display, _open_bars
    # Under torchrun (which sets RANK) rank 0 speaks for all: each rank's share is the same size.
    if disable or os.environ.get("RANK", "0") != "0":
        yield Bar(None)
        return
    stream = log_stream()
    log = None if stream is None else LogLines(stream, description, total, unit, completed, transient)
    live = sys.stderr.isatty()  # elsewhere rich would draw the bar only when it stops: the log lines say it instead
    task = None
    if live:
        if _display is None:
            _display = _new_display()
            _display.start()
        _open_bars += 1
        task = _display.add_task(description, total=total, completed=completed, unit=unit)
    try:
        yield Bar(task, log)
    finally:
        if log is not None:
            log.close()
        if live:
            if transient:
                _display.remove_task(task)
            _open_bars -= 1
            if _open_bars == 0:
                _display.stop()
                _display = None


def track(items: Iterable[T], description: str, *, total: int | None = None, unit: str = "",
          transient: bool = False, disable: bool = False) -> Iterator[T]:
    """Iterate over `items` with a bar (its length from `total`, else len(items) where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with progress_bar(total, description, unit=unit, transient=transient, disable=disable) as bar:
        for item in items:
            yield item
            bar.advance()


@contextmanager
def timed(seconds: dict, stage: str) -> Iterator[None]:
    """Record the wall time of the `with` block in `seconds[stage]` (rounded to 0.1 s): a job's stage table."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 1)
