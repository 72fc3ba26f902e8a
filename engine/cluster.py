"""The Dask client every engine command runs on: the caller's, a remote scheduler's, or a local cluster."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from scdino.errors import ConfigError


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices when it is unset)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return names[:n] if names else [str(i) for i in range(n)]


def gpu_for(worker_name: Any, devices: list[str]) -> str:
    """The GPU of ``devices`` a local worker gets: round robin by its name (LocalCluster names workers 0, 1, ...)."""
    try:
        i = int(worker_name)
    except (TypeError, ValueError):
        i = sum(map(ord, str(worker_name)))
    return devices[i % len(devices)]


def pin_gpu_plugin(devices: list[str]):
    """A Dask worker plugin that sets each worker's ``CUDA_VISIBLE_DEVICES`` to its own GPU (:func:`gpu_for`) before
    the worker first touches CUDA, so that every backend uses "its" device 0."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class PinGPU(WorkerPlugin):
        name = "scdino-pin-gpu"

        def setup(self, worker) -> None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu_for(worker.name, devices)

    return PinGPU()


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells, e.g. under taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def cpu_threads_per_worker(workers: int) -> int:
    """Threads of a local CPU worker: twice its share of the cores. Its model uses the share (one inference at a time
    per worker, see :mod:`scdino.engine.stream`); the other threads mostly wait: on the feeder processes that find
    cells and cut crops (:mod:`scdino.engine.feed`), one thread each, and on the model."""
    return max(2, 2 * (cores() // max(1, workers)))


def gpu_threads_per_worker(workers: int) -> int:
    """Threads of a local GPU worker: its share of the host's cores, at least two (one feeds the GPU while the others
    wait on the feeder processes that find cells and cut crops)."""
    return max(2, cores() // max(1, workers))


def local_cuda_cluster(workers: int, devices: list[str], quiet: bool):
    """One worker per GPU, with its share of the host's cores as threads: dask-cuda's
    LocalCUDACluster where it is installed, else a LocalCluster whose workers are pinned by :func:`pin_gpu_plugin`."""
    level = logging.CRITICAL if quiet else logging.WARNING
    common = dict(
        n_workers=workers,
        threads_per_worker=gpu_threads_per_worker(workers),
        dashboard_address=":0",
        silence_logs=level,
    )
    try:
        if workers > len(devices):  # dask-cuda runs at most one worker per GPU; more share GPUs round robin
            raise ImportError
        from dask_cuda import LocalCUDACluster
    except ImportError:
        from distributed import LocalCluster

        return LocalCluster(processes=True, **common), pin_gpu_plugin(devices)
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), **common), None


@contextmanager
def keep_malloc_adaptive(enabled: bool = True) -> Iterator[None]:
    """Start local workers without Dask's ``MALLOC_TRIM_THRESHOLD_``: setting it switches off glibc's adaptive mmap
    threshold, so every large activation tensor of a model is mapped and page-faulted afresh per batch
    (``python benchmarks/worker_malloc.py``: ViT-S/16 at 224 px embeds 1.14x faster without it on the 2-core CPU).
    ``SCDINO_DASK_MALLOC_TRIM=1`` keeps Dask's setting."""
    import dask
    import distributed  # noqa: F401  (loads its configuration)

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    if not enabled or "MALLOC_TRIM_THRESHOLD_" not in env:
        yield
        return
    env.pop("MALLOC_TRIM_THRESHOLD_")
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        yield


@contextmanager
def quiet_workers() -> Iterator[None]:
    """Local workers start without Dask's statistical profiler: every 10 ms it walks the stack of every thread of the
    worker's process, and an in-process worker's process is the whole command (its feeding threads, its writer). On
    a 100,000-cell null-backend run on 2 cores it cost about 0.3 s of the command's 4 s of CPU, two pairs of runs
    side by side. ``SCDINO_DASK_PROFILE=1`` keeps it (the dashboard's profile page needs it)."""
    import dask

    if os.environ.get("SCDINO_DASK_PROFILE") == "1":
        yield
        return
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        yield


@contextmanager
def dask_client(scheduler: str | None = None, workers: int = 1, gpus: list[str] | None = None) -> Iterator[Any]:
    """An existing client, a cluster at ``scheduler``, or a local cluster of ``workers`` workers: processes, or with one CPU worker a thread of this process (with ``gpus``: one process per GPU,
    each pinned)."""
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
    plugin = None
    with keep_malloc_adaptive(os.environ.get("SCDINO_DASK_MALLOC_TRIM") != "1"), quiet_workers():
        if gpus:
            cluster, plugin = local_cuda_cluster(workers, gpus, quiet)
        else:
            # one CPU worker runs in this process (a thread): no second interpreter to start and import into (about
            # 3 s of every run); several workers are processes, so that each has its own cores and memory
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=cpu_threads_per_worker(workers),
                processes=workers > 1,
                dashboard_address=":0",
                silence_logs=logging.CRITICAL if quiet else logging.WARNING,
            )
    client = Client(cluster)
    client.scdino_own_cluster = True  # no worker joins it: a worker's crops stay where its tasks run (stream)
    if plugin is not None:
        client.register_plugin(plugin)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
