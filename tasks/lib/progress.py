"""One progress reporter for the long steps (the copy of sync, the upload).

A step hands `Progress` snapshots to a reporter made by `console_reporter()`:

- stderr is a terminal: a tqdm bar, redrawn at most every `REDRAW_SECONDS`;
- stderr is not a terminal (CI, a doit log, the live system, whose output goes
  to a log on NFS): plain log lines, never a carriage return or an escape
  code, one when `every` seconds have passed or the next tenth of the total is
  reached, whichever comes first, and always the final one.

Either way the plain lines go to the stage log (at debug level while a bar is
drawn, so that the terminal does not show them twice).

Every figure is a count the step really made: bytes and files done are
measured, a total that is an estimate is marked `~`, and a total that is not
known is said to be unknown, with no percentage or ETA made up for it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from tqdm import tqdm

log = logging.getLogger("p2v.progress")

PLAIN_EVERY_SECONDS = 10.0  # at most this long between two plain lines
PLAIN_STEPS = 10  # and a line at every tenth of a known total
REDRAW_SECONDS = 0.5  # the bar's redraw rate: fast enough to look alive, cheap for a 1 MiB read loop
BAR_WIDTH = 20


def human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass(frozen=True)
class Progress:
    """Where one step is: bytes (and files) done of what total, for a console line."""

    step: str  # the line's first word: "copy", "upload"
    bytes_done: int
    bytes_total: int | None  # None: not known
    elapsed: float  # seconds since the step started
    files_done: int | None = None  # None: the step does not count files
    files_total: int | None = None
    estimated: bool = False  # the totals are estimates (the copy's: what the source holds)
    where: str = ""  # what is being worked on now (the copy's filesystem)
    final: bool = False  # the last report of this piece of work

    @property
    def rate(self) -> float:
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def fraction(self) -> float | None:
        """Done of the total, at most 1 (an estimate can be passed); None when the total is unknown."""
        if self.bytes_total is None:
            return None
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total else 1.0

    @property
    def eta(self) -> str:
        left = None if self.bytes_total is None else self.bytes_total - self.bytes_done
        if left is not None and left <= 0:
            # All of a known total is done; an estimate passed before the end says nothing.
            return "0:00:00" if self.final or not self.estimated else "?"
        if left is None or self.rate <= 0:
            return "?"
        # Also at the end of one of several parts (the copy's filesystems): the rest's.
        return duration(left / self.rate)

    def text(self) -> str:
        """The figures, without the step's name."""
        approx = "~" if self.estimated else ""
        fraction = self.fraction
        if fraction is None:
            parts = [f"{human(self.bytes_done)} of an unknown total"]
        else:
            parts = [f"{human(self.bytes_done)} of {approx}{human(self.bytes_total or 0)} ({100 * fraction:.0f}%)"]
        if self.files_done is not None:
            if self.files_total is None:
                parts.append(f"{self.files_done:,} files of an unknown number")
            else:
                parts.append(f"{self.files_done:,} of {approx}{self.files_total:,} files")
        parts.append(f"{human(self.rate)}/s")
        text = ", ".join(parts)
        if fraction is not None:
            text += f", ETA {self.eta}"
        return text + (f" [{self.where}]" if self.where else "")

    def line(self) -> str:
        return f"{self.step}: {self.text()}"


Reporter = Callable[[Progress], None]


class PlainLines:
    """Rate-limited plain lines: no carriage return, no escape code; the final line always."""

    def __init__(self, emit: Callable[[str], None], every: float = PLAIN_EVERY_SECONDS,
                 steps: int = PLAIN_STEPS, clock: Callable[[], float] = time.monotonic):
        self.emit = emit
        self.every = every
        self.steps = steps
        self.clock = clock
        self.last_time = clock()
        self.last_step = 0  # the tenth of the total that the last line reached
        self.last_elapsed = 0.0

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        # A step that starts its clock again starts over (a retried upload): its
        # tenths are news again. A measured count that dips (a filesystem's usage
        # shrinks as it trims preallocations) does not.
        if progress.elapsed < self.last_elapsed:
            self.last_step = 0
        self.last_elapsed = progress.elapsed
        fraction = progress.fraction
        step = int(fraction * self.steps) if fraction is not None else 0
        if progress.final or now - self.last_time >= self.every or step > self.last_step:
            self.emit(progress.line())
            self.last_time = now
            self.last_step = step


class _Bar(tqdm):  # type: ignore[misc]  # tqdm ships no type information
    monitor_interval = 0  # no monitor thread: we redraw it ourselves


class TerminalBar:
    """A tqdm bar on a terminal, its text our own figures; a new bar after each final report."""

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.clock = clock
        self.bar: Any = None
        self.last_draw = 0.0

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        if not progress.final and self.bar is not None and now - self.last_draw < REDRAW_SECONDS:
            return
        self.last_draw = now
        fraction = progress.fraction
        # The bar's own counter is the fraction in thousandths: tqdm draws the bar
        # from it, and every figure shown is the text, which is ours.
        count = round(1000 * fraction) if fraction is not None else progress.bytes_done
        # The terminal's size now. One that reports none (a serial console, a pty
        # nobody sized: 0x0) gets 80x24: tqdm itself would draw nothing there.
        width, height = shutil.get_terminal_size((80, 24))
        line = progress.line()
        # The figures come first: the bar only where the line leaves room for it.
        fits = fraction is not None and len(line) + BAR_WIDTH + 3 <= width
        shape = f"{{desc}} |{{bar:{BAR_WIDTH}}}|" if fits else "{desc}"
        if self.bar is None:  # drawn as it is made
            self.bar = _Bar(total=1000 if fraction is not None else None, initial=count, desc=line,
                            file=self.stream, leave=True, mininterval=0, ncols=width, nrows=height,
                            bar_format=shape)
        else:
            self.bar.set_description_str(line, refresh=False)
            self.bar.n = count
            self.bar.ncols, self.bar.nrows, self.bar.bar_format = width, height, shape
            self.bar.refresh()
        if progress.final:
            self.bar.close()
            self.bar = None


def console_reporter(stream: IO[str] | None = None, every: float = PLAIN_EVERY_SECONDS) -> Reporter:
    """A bar when `stream` (stderr by default) is a terminal, otherwise plain lines.

    The plain lines go through logging, into the stage log and, through the
    console handler, onto stderr; beside a bar only into the stage log.
    """
    out = stream or sys.stderr
    if out.isatty():
        bar = TerminalBar(out)
        lines = PlainLines(lambda text: log.debug("%s", text), every)

        def both(progress: Progress) -> None:
            bar(progress)
            lines(progress)

        return both
    return PlainLines(lambda text: log.info("%s", text), every)
