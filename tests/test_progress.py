"""Progress in a log: with the output redirected (not a terminal), every bar writes plain lines at a steady pace
while it runs, instead of nothing until its stage ends."""

import pytest

from qtoolkit import progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def test_a_bar_writes_a_line_at_every_tenth_and_when_it_ends(capsys, clock):
    with progress.progress_bar(20, "calibration ndtc", unit="step") as bar:
        for _ in range(20):
            clock.now += 3
            bar.advance()
    lines = capsys.readouterr().out.splitlines()  # pytest's stdout is no terminal: the lines go there
    assert len(lines) == 10, lines  # 2/20, 4/20, ..., 18/20, then the closing line
    assert lines[0] == "calibration ndtc: 2/20 step, 0:00:06 elapsed, eta 0:00:54"
    assert lines[4] == "calibration ndtc: 10/20 step, 0:00:30 elapsed, eta 0:00:30"
    assert lines[-1] == "calibration ndtc: 20/20 step, done in 0:01:00"


def test_a_slow_stage_writes_a_line_at_least_every_30_seconds(capsys, clock):
    with progress.progress_bar(1000, "sampling", unit="batch") as bar:
        for _ in range(3):
            clock.now += 25
            bar.advance()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sampling: 2/1000 batch, 0:00:50 elapsed, eta 6:55:50"  # 50 s after the last line (the start)
    assert lines[-1] == "sampling: 3/1000 batch, done in 0:01:15"


def test_an_inner_bar_writes_only_the_timed_lines(capsys, clock):
    with progress.progress_bar(10, "denoising", unit="step", transient=True) as bar:
        for _ in range(10):
            clock.now += 1
            bar.advance()
        clock.now += 40
        bar.advance(0)
    assert capsys.readouterr().out.splitlines() == ["denoising: 10/10 step, 0:00:50 elapsed, eta 0:00:00"]


def test_a_disabled_bar_writes_nothing(capsys, clock):
    with progress.progress_bar(10, "quiet", disable=True) as bar:
        bar.advance(10)
    assert capsys.readouterr().out == ""


def test_the_tenths_are_counted_exactly(capsys, clock):
    with progress.progress_bar(100, "calibration", unit="step") as bar:
        for _ in range(100):
            clock.now += 0.1
            bar.advance()
    counts = [line.split(": ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines()]
    assert counts == [f"{k}/100" for k in range(10, 101, 10)]  # 30/100 too, where 3 x 0.1 < 0.3 in floats
