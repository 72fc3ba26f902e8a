"""The Dask client every engine command runs on: the caller's, a remote scheduler's, or a local cluster."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from scdino.errors import ConfigError


@contextmanager
def dask_client(scheduler: str | None = None, workers: int = 1) -> Iterator[Any]:
    """An existing client, a cluster at ``scheduler``, or a local cluster of ``workers`` single-threaded processes."""
    from distributed import Client, LocalCluster, get_client

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); is it running?") from exc
        try:
            yield client
        finally:
            client.close()
        return
    try:
        existing = get_client()  # reuse the caller's client
    except ValueError:
        existing = None
    if existing is not None:
        yield existing
        return
    # the scheduler always serves HTTP (health, metrics); a free port instead of 8787 avoids a clash and its warning.
    # A task's failure comes back to this process as the task's own error (one line from the command line): the
    # workers' log of it is noise. The command line asks for quiet workers (DASK_LOGGING__DISTRIBUTED, set unless -v)
    quiet = os.environ.get("DASK_LOGGING__DISTRIBUTED", "").lower() in ("error", "critical")
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL if quiet else logging.WARNING,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
