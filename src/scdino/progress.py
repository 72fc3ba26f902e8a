"""Progress a person can follow on a terminal and in a log file alike.

On a terminal, :class:`Progress` draws a tqdm bar. Anywhere else (nohup, a pipe, a batch scheduler's log) it logs a
line when the work starts, then one at least every interval whatever the size of a unit of work (a clock thread
writes it while a long block is still being embedded): done / total, rate and time left, and a last line with the
total time. :func:`heartbeat`
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

    def __init__(
        self, total: int, desc: str, unit: str = "cell", enabled: bool = True, initial: int = 0, growing: bool = False
    ) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        #: the total is what is known so far (cells of the fields searched yet): no percentage and no time left
        #: until :meth:`set_total` says it is final
        self.growing = growing
        self.done = self.start_done = int(initial)
        self.enabled = enabled and (self.total > 0 or growing)
        self.t0 = self.last = time.monotonic()
        self.bar = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clock: threading.Thread | None = None
        if self.enabled and on_terminal():
            from tqdm.auto import tqdm

            total = None if growing else self.total  # tqdm shows no percentage or time left without a total
            self.bar = tqdm(total=total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True)
        elif self.enabled:
            if growing:
                log.info("%s: %d+ %ss to do (more as they are found)", self.desc, self.total, self.unit)
            else:
                log.info("%s: %d/%d %ss to do", self.desc, self.total - self.done, self.total, self.unit)
            if interval() > 0:  # (0: a line per finished unit, nothing in between)
                self._clock = threading.Thread(target=self._tick, name=f"progress {desc}", daemon=True)
                self._clock.start()

    def _tick(self) -> None:
        """Log the line whenever an interval has passed without one (a unit of work that takes longer than it)."""
        while True:
            with self._lock:
                due = self.last + interval() - time.monotonic()
            if self._stop.wait(max(0.05, due)):
                return
            self._log_if_due()

    def _log_if_due(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self.last >= interval() and (self.done < self.total or self.growing) and not self._stop.is_set():
                self.last = now
                log.info(self.line())

    def line(self) -> str:
        """``desc: done/total unit (pct), rate unit/s, ETA``; before the first unit is done, the time so far. While
        the total is still growing it reads ``done/total+`` and gives no share and no time left."""
        elapsed = time.monotonic() - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        total, share = (f"{self.total}+", "more being found") if self.growing else (f"{self.total}", f"{pct:.0f}%")
        head = f"{self.desc}: {self.done}/{total} {self.unit}s ({share})"
        if self.done == self.start_done:
            return f"{head}, {duration(elapsed)} so far"
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        if self.growing:
            return f"{head}, {rate:.1f} {self.unit}s/s, time left once all are found"
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = duration(left) if left == left else "unknown"
        return f"{head}, {rate:.1f} {self.unit}s/s, {eta} left"

    def set_total(self, total: int, final: bool = True) -> None:
        """A new total (work that is found while it is done: cells as fields are searched); ``final`` once no more
        will come (from then on the line has a share and a time left)."""
        self.total = int(total)
        was, self.growing = self.growing, not final
        if self.bar is not None:
            if final:
                self.bar.total = self.total
                self.bar.refresh()
            else:
                self.bar.set_postfix_str(f"{self.total} known so far", refresh=True)
        elif final and was and self.enabled:
            log.info("%s: all %d %ss known, %d to do", self.desc, self.total, self.unit, self.total - self.done)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        self._log_if_due()

    def _stop_clock(self) -> None:
        self._stop.set()
        if self._clock is not None:
            self._clock.join()
            self._clock = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._stop_clock()
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
            return
        self._stop_clock()
        if self.bar is not None:
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
