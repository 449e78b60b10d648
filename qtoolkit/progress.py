"""Progress bars for every long stage, drawn by rich on standard error.

One `rich.progress.Progress` display is shared by every bar that is open at the same time, so that bars
nest (sampling's batches, and each batch's denoising steps below them) instead of fighting over the
terminal: the display starts with the first bar and stops when the last one closes. Bars opened with
`transient=True` vanish when they close (inner loops); the others stay as a record of what ran.

    with progress_bar(total, "calibration ndtc", unit="step") as bar:
        bar.advance()
    for batch in track(batches, "calibrate", unit="batch"):
        ...
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

T = TypeVar("T")

_display: Progress | None = None
_open_bars = 0


class Bar:
    """One task of the shared display; a disabled bar accepts the same calls and shows nothing."""

    def __init__(self, task: TaskID | None) -> None:
        self._task = task

    def advance(self, steps: float = 1) -> None:
        if self._task is not None:
            _display.advance(self._task, steps)

    def update(self, *, description: str | None = None, total: float | None = None) -> None:
        if self._task is not None:
            _display.update(self._task, description=description, total=total)


def _new_display() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=Console(stderr=True))


@contextmanager
def progress_bar(total: float | None, description: str, *, unit: str = "", completed: float = 0,
                 transient: bool = False, disable: bool = False) -> Iterator[Bar]:
    """A bar of `total` steps (None: unknown) labelled `description`, open for the `with` block."""
    global _display, _open_bars
    if disable:
        yield Bar(None)
        return
    if _display is None:
        _display = _new_display()
        _display.start()
    _open_bars += 1
    task = _display.add_task(description, total=total, completed=completed, unit=unit)
    try:
        yield Bar(task)
    finally:
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
