"""Progress of a long loop: a bar on a terminal, plain lines at a steady interval in a log, or nothing.

On a terminal a tqdm bar redraws in place. Anywhere else (``make run > log``, CI, a Prefect
worker that forwards a stage's output into the flow's log) a bar's carriage returns would
either vanish or pile up, so the loop prints one self-contained line every ``interval``
seconds, and one at the end:

    train: step 120/1860 (6%), loss -0.01234, real score 0.0123, fake score -0.0345, 0.270 s/it, ETA 7m50s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from tqdm.auto import tqdm

MODES = ("bar", "lines", "off")


def progress_mode(show: bool, stream: TextIO | None = None) -> str:
    """``bar`` when ``stream`` (stderr) is a terminal, ``lines`` when it is not, ``off`` when not ``show``."""
    if not show:
        return "off"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def as_mode(progress: str | bool) -> str:
    """A mode from a mode or a flag: True is the bar (what ``progress=True`` always meant), False is off."""
    if isinstance(progress, bool):
        return "bar" if progress else "off"
    if progress not in MODES:
        raise ValueError(f"progress: mode {progress!r} is not one of {', '.join(MODES)}")
    return progress


def format_duration(seconds: float) -> str:
    """42s, 7m50s, 2h05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _number(value: float) -> str:
    return f"{value:.4g}"


class Progress:
    """Steps done out of ``total``, with optional statistics, shown as ``mode`` says.

    ``update(n, stats)`` advances by ``n`` steps; ``stats`` (label -> value, e.g. ``{"loss": 0.1}``)
    are the latest known values and are shown until newer ones arrive. ``moveto(step)`` sets the
    position (a rollback). ``write`` prints a message line whatever the mode, without breaking a bar.
    ``interval`` is in seconds (0: a line at every update); ``clock`` is for tests.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        mode: str | bool = "off",
        interval: float = 30.0,
        initial: int = 0,
        unit: str = "it",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.mode = as_mode(mode)
        self.interval = interval
        self.stream = stream
        self.clock = clock
        self.n = self.start_n = initial
        self.stats: dict[str, float] = {}
        self.start = self.last_line = clock()
        self.lines = 0  # plain lines printed
        self.bar = None
        if self.mode == "bar":
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, leave=False,
                file=stream if stream is not None else sys.stderr,
            )

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def update(self, n: int = 1, stats: Mapping[str, float] | None = None) -> None:
        self.n += n
        if stats:
            self.stats.update(stats)
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix(ordered_dict={k: _number(v) for k, v in self.stats.items()}, refresh=False)
        elif self.mode == "lines":
            now = self.clock()
            if now - self.last_line >= self.interval or self.n >= self.total:
                self.last_line = now
                self._print_line()

    def due(self, n: int = 1) -> bool:
        """Whether advancing by ``n`` would print a line now: a caller fetches fresh statistics only then."""
        if self.mode != "lines":
            return False
        return self.clock() - self.last_line >= self.interval or self.n + n >= self.total

    def moveto(self, n: int) -> None:
        """Set the position without counting steps (a rollback to an earlier step)."""
        self.n = self.start_n = n
        self.start = self.clock()
        if self.bar is not None:
            self.bar.n = n
            self.bar.refresh()

    def line(self) -> str:
        """The plain progress line for the current position."""
        now = self.clock()
        done = self.n - self.start_n
        parts = [f"{self.desc}: step {self.n}/{self.total} ({100 * self.n // max(1, self.total)}%)"]
        parts += [f"{label} {_number(value)}" for label, value in self.stats.items()]
        if done > 0:
            per_step = (now - self.start) / done
            parts.append(f"{per_step:.3g} s/{self.unit}")
            parts.append(f"ETA {format_duration(per_step * max(0, self.total - self.n))}")
        return ", ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=self._out(), flush=True)
        self.lines += 1

    def write(self, message: str) -> None:
        if self.bar is not None:
            tqdm.write(message, file=self._out())
        else:
            print(message, file=self._out(), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["MODES", "Progress", "as_mode", "format_duration", "progress_mode"]
