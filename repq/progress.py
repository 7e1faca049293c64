"""Progress of every long step: a tqdm bar with an ETA on a terminal, a line every few percent in a log.

CI logs and files get plain lines (``ptq max: 40/200 (20%), 12 s, ETA 48 s``) instead of a bar's carriage
returns, so a long step is never silent and a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO

LOG_EVERY = 0.05  # a plain line each time another 5% is done


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _plural(unit: str) -> str:
    return f"{unit}es" if unit.endswith(("s", "sh", "ch", "x")) else f"{unit}s"


class Progress:
    """``update()`` once per unit of work; ``close()`` at the end (or use it as a context manager).

    ``enabled=False`` prints nothing (ranks other than 0, or a caller that asked for quiet)."""

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0, enabled: bool = True,
                 stream: IO[str] | None = None, tty: bool | None = None):
        self.total, self.desc, self.unit, self.done = max(int(total), 0), desc, unit, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) if tty is None else tty
        self.start, self.start_done = time.perf_counter(), self.done
        self.next_line = self._next_threshold()
        self.postfix = ""
        self._bar = None
        if self.enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, leave=False,
                             file=self.stream, mininterval=0.5, dynamic_ncols=True)

    def _next_threshold(self) -> int:
        step = max(1, int(self.total * LOG_EVERY))
        return (self.done // step + 1) * step

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if not self.enabled:
            return
        if postfix:
            self.postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(n)
        elif self.done >= self.next_line or self.done >= self.total:
            self._line()
            self.next_line = self._next_threshold()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        eta = f", ETA {_fmt_seconds(left)}" if self.done < self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}/{self.total} {_plural(self.unit)} ({100 * self.done / self.total:.0f}%)"
              f"{extra}, {_fmt_seconds(elapsed)}{eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable, total: int | None = None, desc: str = "", *, unit: str = "batch", enabled: bool = True):
    """Iterate ``iterable`` with a Progress (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else 0
    with Progress(total, desc, unit=unit, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()


class Tracked:
    """An iterable with a length (a DataLoader) that shows progress as it is iterated: for callers that take a
    loader and iterate it themselves (an engine's ``evaluate``)."""

    def __init__(self, iterable, desc: str, *, unit: str = "batch", enabled: bool = True):
        self.iterable, self.desc, self.unit, self.enabled = iterable, desc, unit, enabled

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        return progress(self.iterable, len(self.iterable), self.desc, unit=self.unit, enabled=self.enabled)
