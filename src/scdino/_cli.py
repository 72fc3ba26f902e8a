"""Shared pieces of the command-line tools: logging set-up and one-line errors."""

from __future__ import annotations

import logging
import os
import sys

import click

from scdino.errors import ScdinoError
from scdino.outputs import WRITE_ERRNOS, write_failure


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a command run in-process, e.g. by click's CliRunner,
    must not leave the root logger holding the runner's closed stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        tqdm = sys.modules.get("tqdm")  # a progress bar may be drawn only where tqdm was imported
        if tqdm is not None and getattr(tqdm.tqdm, "_instances", None) and _isatty(self.stream):
            try:  # above the bars, which are drawn again below it (a plain write would break a bar's line)
                tqdm.tqdm.write(self.format(record), file=self.stream)
            except Exception:
                self.handleError(record)
            return
        super().emit(record)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def not_dask_shutdown_noise(record: logging.LogRecord) -> bool:
    """False for asyncio's "Future exception was never retrieved" about a TimeoutError: a connection of Dask's local
    cluster that timed out while it closed on a busy machine, after the run's work was done and written (its own
    errors come back to the command as the task's error). Shown again with -v."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (
        record.name == "asyncio"
        and str(record.msg).startswith("Future exception was never retrieved")
        and isinstance(exc, TimeoutError)
    )


def configure_logging(verbose: int) -> None:
    """scdino's own messages from INFO up; other libraries' (dask, distributed) only as asked with -v/-vv."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    floor = logging.INFO if verbose < 2 else logging.DEBUG
    handler.addFilter(lambda r: r.levelno >= (floor if r.name.startswith("scdino") else level))
    logging.basicConfig(level=min(level, logging.INFO), handlers=[handler], force=True)
    import warnings

    # upstream notices that say nothing about the user's data, at any verbosity
    warnings.filterwarnings("ignore", message=".*autosharding.*")
    warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
    if verbose == 0:
        # Dask's own chatter (a worker's failed task is reported as scdino's one-line error; a slow worker exit at
        # the end of a successful run is not news)
        # (set before dask is imported: its logging configuration reads it, here and in local worker processes)
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        handler.addFilter(not_dask_shutdown_noise)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"zarr\..*|anndata\..*|contextlib")


def handle_errors(fn, resume_hint: str = "run the same command again to continue where it stopped"):
    """Call ``fn``; scdino's own errors and failed writes (a full disk, a read-only location) become one line on stderr
    and exit code 2, Ctrl-C exit code 130. The writers remove what they left half-written before the error comes
    here."""
    try:
        return fn()
    except ScdinoError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        click.echo(f"error: {write_failure(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {resume_hint}", err=True)
        sys.exit(130)


class ErrorGroup(click.Group):
    """A click group whose commands report errors through :func:`handle_errors`."""

    def invoke(self, ctx: click.Context):
        return handle_errors(lambda: super(ErrorGroup, self).invoke(ctx))
