"""Shared pieces of the command-line tools: logging set-up and one-line errors."""

from __future__ import annotations

import logging
import sys

import click

from scdino.errors import ScdinoError


def configure_logging(verbose: int) -> None:
    """scdino's own messages from INFO up; other libraries' (dask, distributed) only as asked with -v/-vv."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    floor = logging.INFO if verbose < 2 else logging.DEBUG
    handler.addFilter(lambda r: r.levelno >= (floor if r.name.startswith("scdino") else level))
    logging.basicConfig(level=min(level, logging.INFO), handlers=[handler], force=True)
    if verbose == 0:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module=r"zarr\..*|anndata\..*|contextlib")


class ErrorGroup(click.Group):
    """Turn scdino's own errors into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ScdinoError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command again to continue where it stopped", err=True)
            sys.exit(130)
