"""The shared progress reporter (tasks/lib/progress.py): the plain lines a log gets without a
terminal, exact; their rate limit; the final line; an unknown total; and the bar on a terminal."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from tasks.lib import progress as progress_module
from tasks.lib.progress import PlainLines, Progress, TerminalBar, console_reporter

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def upload(done: int, total: int | None = 100 * MiB, elapsed: float = 10.0, final: bool = False) -> Progress:
    return Progress("upload", done, total, elapsed, final=final)


def test_lines_are_exact() -> None:
    assert upload(25 * MiB).line() == "upload: 25.0 MiB of 100.0 MiB (25%), 2.5 MiB/s, ETA 0:00:30"
    assert upload(100 * MiB, final=True).line() == "upload: 100.0 MiB of 100.0 MiB (100%), 10.0 MiB/s, ETA 0:00:00"
    copy = Progress("copy", 3 * MiB, 12 * MiB, 3.0, files_done=1500, files_total=6000, estimated=True, where="/srv")
    assert copy.line() == "copy: 3.0 MiB of ~12.0 MiB (25%), 1,500 of ~6,000 files, 1.0 MiB/s, ETA 0:00:09 [/srv]"


def test_an_estimate_passed_before_the_end_claims_no_finish() -> None:
    """The copy's total is what the source uses; the target can hold more before it is done."""
    over = Progress("copy", 13 * MiB, 12 * MiB, 13.0, files_done=10, files_total=9, estimated=True, where="/")
    assert over.line() == "copy: 13.0 MiB of ~12.0 MiB (100%), 10 of ~9 files, 1.0 MiB/s, ETA ? [/]"
    assert over.fraction == 1.0


def test_an_unknown_total_is_said_so() -> None:
    line = Progress("copy", 5 * MiB, None, 5.0, files_done=42, files_total=None).line()
    assert line == "copy: 5.0 MiB of an unknown total, 42 files of an unknown number, 1.0 MiB/s"
    assert "%" not in line and "ETA" not in line


def test_nothing_done_yet_has_no_eta() -> None:
    assert upload(0, elapsed=0.0).line() == "upload: 0 B of 100.0 MiB (0%), 0 B/s, ETA ?"


def test_plain_lines_at_each_tenth_and_the_final_one() -> None:
    lines: list[str] = []
    clock = Clock()
    show = PlainLines(lines.append, every=10.0, clock=clock)
    for done in range(0, 101):  # 1 MiB steps, no time passing
        show(upload(done * MiB, final=done == 100))
    assert [line.split(" (")[1].split(")")[0] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[-1] == "upload: 100.0 MiB of 100.0 MiB (100%), 10.0 MiB/s, ETA 0:00:00"


def test_plain_lines_every_so_many_seconds_between_tenths() -> None:
    lines: list[str] = []
    clock = Clock()
    show = PlainLines(lines.append, every=10.0, clock=clock)
    for second in range(1, 31):  # 30 s within the first tenth
        clock.now = float(second)
        show(upload(second * 100_000, elapsed=float(second)))
    assert [line.split(", ")[0] for line in lines] == [
        "upload: 976.6 KiB of 100.0 MiB (1%)", "upload: 1.9 MiB of 100.0 MiB (2%)", "upload: 2.9 MiB of 100.0 MiB (3%)"]


def test_the_final_line_is_always_printed() -> None:
    lines: list[str] = []
    clock = Clock()
    show = PlainLines(lines.append, every=10.0, clock=clock)
    show(upload(10 * MiB))
    show(upload(11 * MiB, final=True))  # neither a new tenth nor 10 s: the final one all the same
    assert lines == ["upload: 10.0 MiB of 100.0 MiB (10%), 1.0 MiB/s, ETA 0:01:30",
                     "upload: 11.0 MiB of 100.0 MiB (11%), 1.1 MiB/s, ETA 0:01:21"]


def test_unknown_total_lines_come_by_time_alone() -> None:
    lines: list[str] = []
    clock = Clock()
    show = PlainLines(lines.append, every=10.0, clock=clock)
    for second in range(1, 26):
        clock.now = float(second)
        show(Progress("copy", second * MiB, None, float(second)))
    show(Progress("copy", 26 * MiB, None, 26.0, final=True))
    assert lines == ["copy: 10.0 MiB of an unknown total, 1.0 MiB/s", "copy: 20.0 MiB of an unknown total, 1.0 MiB/s",
                     "copy: 26.0 MiB of an unknown total, 1.0 MiB/s"]


def test_a_restart_reports_its_tenths_again() -> None:
    """A retried upload starts over on a new image: its tenths are news again."""
    lines: list[str] = []
    show = PlainLines(lines.append, clock=Clock())
    for done, elapsed in ((50, 5.0), (0, 0.0), (10, 1.0), (50, 5.0)):
        show(upload(done * MiB, elapsed=elapsed))
    assert [line.split(" (")[1].split(")")[0] for line in lines] == ["50%", "10%", "50%"]


def test_a_count_that_dips_repeats_no_tenth() -> None:
    """The copy's figures are measured target usage, which can shrink a little while a file
    system trims its preallocations: that is no restart."""
    lines: list[str] = []
    show = PlainLines(lines.append, clock=Clock())
    for done, elapsed in ((21, 1.0), (19, 2.0), (21, 3.0), (30, 4.0)):
        show(upload(done * MiB, elapsed=elapsed))
    assert [line.split(" (")[1].split(")")[0] for line in lines] == ["21%", "30%"]


def test_without_a_terminal_lines_go_to_the_log_and_never_carry_control_codes(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    show = console_reporter(stream)
    with caplog.at_level(logging.DEBUG, logger="p2v.progress"):
        show(upload(50 * MiB))
        show(upload(100 * MiB, final=True))
    assert stream.getvalue() == ""  # through logging, whose console handler is plain
    assert [r.getMessage() for r in caplog.records] == [upload(50 * MiB).line(), upload(100 * MiB, final=True).line()]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert not any(c in r.getMessage() for r in caplog.records for c in "\r\x1b")


def test_on_a_terminal_a_bar_and_the_lines_only_in_the_log(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    terminal = Terminal()
    show = console_reporter(terminal)
    with caplog.at_level(logging.DEBUG, logger="p2v.progress"):
        show(upload(50 * MiB))
        show(upload(100 * MiB, final=True))
    drawn = terminal.getvalue()
    assert "\r" in drawn and drawn.endswith("\n")
    assert upload(100 * MiB, final=True).line() + " |" in drawn  # our figures, then the bar
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


def test_the_bar_redraws_at_most_twice_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    terminal = Terminal()
    clock = Clock()
    bar = TerminalBar(terminal, clock=clock)
    for done in range(1, 99):
        bar(upload(done * MiB))
    clock.now = progress_module.REDRAW_SECONDS
    bar(upload(99 * MiB))
    bar(upload(100 * MiB, final=True))
    drawn = terminal.getvalue()
    assert "upload: 1.0 MiB of" in drawn and "upload: 99.0 MiB of" in drawn
    assert not any(f"upload: {done}.0 MiB of" in drawn for done in range(2, 99))
    assert drawn.endswith(upload(100 * MiB, final=True).line() + " |" + "#" * progress_module.BAR_WIDTH + "|\n")


def test_a_narrow_terminal_gets_the_figures_without_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures are what matters; a terminal with no room for both (or one that reports no
    size: 80 columns are assumed) loses the bar, not the ETA."""
    monkeypatch.setenv("COLUMNS", "70")
    terminal = Terminal()
    TerminalBar(terminal, clock=Clock())(upload(100 * MiB, final=True))
    assert {part for part in terminal.getvalue().strip("\r\n").split("\r") if part} == {
        "upload: 100.0 MiB of 100.0 MiB (100%), 10.0 MiB/s, ETA 0:00:00"}


def test_at_the_end_of_one_part_the_eta_is_the_rests() -> None:
    """The copy's final report of one filesystem is not the end of the copy."""
    part = Progress("copy", 3 * MiB, 9 * MiB, 3.0, files_done=10, files_total=30, estimated=True, where="/boot",
                    final=True)
    assert part.line() == "copy: 3.0 MiB of ~9.0 MiB (33%), 10 of ~30 files, 1.0 MiB/s, ETA 0:00:06 [/boot]"


def test_the_bar_of_an_unknown_total_shows_the_figures_alone() -> None:
    terminal = Terminal()
    bar = TerminalBar(terminal, clock=Clock())
    bar(Progress("copy", 5 * MiB, None, 5.0, final=True))
    assert {part for part in terminal.getvalue().strip("\r\n").split("\r") if part} == {
        "copy: 5.0 MiB of an unknown total, 1.0 MiB/s"}


def test_copy_and_upload_both_report_through_this_module() -> None:
    """sync's copy and the upload make their reporter here, and nothing else in p2v decides
    between a terminal and plain lines or draws on a terminal itself."""
    project = Path(progress_module.__file__).resolve().parents[2]
    for stage in ("tasks/sync.py", "tasks/upload.py"):
        assert "console_reporter()" in (project / stage).read_text(), stage
    sources = [path for folder in ("tasks", "live") for path in (project / folder).rglob("*.py")]
    drawing = [str(path.relative_to(project)) for path in sources
               if path.name != "progress.py" and re.search(r"isatty\(|\\033\[|\\x1b\[K", path.read_text())]
    assert drawing == []
