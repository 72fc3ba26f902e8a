"""Progress a person can follow on a terminal and in a log file alike.

On a terminal, :class:`Progress` draws a tqdm bar. Anywhere else (nohup, a pipe, a batch scheduler's log) it logs one
line at a steady interval: done / total, rate and time left, and a last line with the total time. :func:`heartbeat`
does the same for a phase that cannot count its work (a UMAP fit): a line every interval saying it is still running.
The interval is 30 s, or ``SCDINO_PROGRESS_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("scdino.progress")


def interval() -> float:
    """Seconds between progress lines when not on a terminal."""
    try:
        return max(0.0, float(os.environ.get("SCDINO_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress of ``total`` units of work called ``desc``; ``update(n)`` as they finish. ``enabled=False`` shows
    nothing (``--no-progress``)."""

    def __init__(self, total: int, desc: str, unit: str = "cell", enabled: bool = True, initial: int = 0) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self.start_done = int(initial)
        self.enabled = enabled and self.total > 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if self.enabled and on_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True)

    def line(self) -> str:
        """``desc: done/total unit (pct), rate unit/s, ETA``."""
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = duration(left) if left == left else "unknown"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), {rate:.1f} {self.unit}s/s, {eta} left"

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= interval() and self.done < self.total:
            self.last = now
            log.info(self.line())

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        else:
            took = time.monotonic() - self.t0
            log.info("%s: %d/%d %ss in %s", self.desc, self.done, self.total, self.unit, duration(took))
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.bar is not None:
            self.bar.close()


@contextmanager
def heartbeat(desc: str, enabled: bool = True) -> Iterator[None]:
    """Log ``desc: still running`` every interval while the body runs (not on a terminal), and the time it took."""
    if not enabled:
        yield
        return
    t0 = time.monotonic()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(interval(), 0.05)):
            log.info("%s: still running, %s so far", desc, duration(time.monotonic() - t0))

    thread = None
    if not on_terminal():
        thread = threading.Thread(target=beat, name=f"heartbeat {desc}", daemon=True)
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    log.info("%s: done in %s", desc, duration(time.monotonic() - t0))
