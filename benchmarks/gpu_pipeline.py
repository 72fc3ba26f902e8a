"""The whole command on a GPU machine: ``scdino-engine run`` end to end, as a user runs it, on a generated plate.

One run of this script, on a fresh GPU machine, within a few minutes:

1. generates an OME-Zarr plate with stored nucleus labels (``pipeline_ceiling.make_plate``: real nucleus crops tiled
   on a 32 px grid, 2048 px fields of 4,096 cells, 3 channels) large enough for the bigger of two sizes;
2. measures the raw decode-and-cut rate of the whole plate on every core (no Dask, no store: the stage's limit);
3. runs ``scdino-engine run`` in a new process at both sizes (the smaller one through ``--wells``), with the null
   backend (``SCDINO_NULL_BACKEND=1``: zeros of the model's width, the pipeline's ceiling on this host) and with the
   model (ViT-S/16 at 224 px by default), each with ``nvidia-smi`` sampling GPU utilisation and memory every 200 ms;
4. reports each run's cells/s (whole command and embedding phase), the steady-state rate from the difference of the
   two sizes (start-up cancels out), and the GPU's utilisation over the embedding phase (the span between the
   engine's first and last ``embedding:`` progress lines); prints a table and writes JSON.

``--workers 1,4`` runs each mode once per worker count (``scdino-engine run --workers``; default: the engine's own,
one worker per GPU), ``--modes model`` leaves out the null backend: ``--modes model --workers 1,4`` compares one worker
with four sharing one GPU, on the same plate.

A device machine reaches no package index: it runs with the wheels of ``benchmarks/device/wheels.txt``
(``--print-wheels`` prints that list; ``benchmarks/device/run.sh`` installs them and runs this script), and scdino
itself is used from this checkout when it is not installed. What is missing is skipped with the reason in one line (a
package that does not import: the whole script, before any plate is made; no CUDA: the model runs, while the
null-backend runs still measure the host; no ``nvidia-smi``: the utilisation).

    python benchmarks/gpu_pipeline.py [--cells 16384,49152] [--model random:vit_small16] [--input-size 224]
    python benchmarks/gpu_pipeline.py --modes model --workers 1,4    # one worker against four on one GPU
    python benchmarks/gpu_pipeline.py --cpu-dry-run      # a tiny plate on the CPU, ViT-test: the script's own check
    python benchmarks/gpu_pipeline.py --print-wheels     # benchmarks/device/wheels.txt: what a device machine lacks
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import machine, print_table, staged_source, unimportable, write_results

ROOT = Path(__file__).resolve().parents[1]
#: modules this script and ``scdino-engine run`` import besides the standard library: each is imported before any
#: work, so that a package missing underneath one of them (ome-zarr's pydantic, say) is named in one line
NEEDED = (
    "torch",
    "numpy",
    "pandas",
    "zarr",
    "numcodecs",
    "dask.array",
    "distributed",
    "anndata",
    "skimage",
    "scipy",
    "click",
    "psutil",
    "ome_zarr.writer",
    "ome_zarr.format",
)
#: the one list of the wheels a device machine needs beyond its image
WHEELS_TXT = ROOT / "benchmarks" / "device" / "wheels.txt"
SAMPLE_MS = 200


class GpuSampler:
    """``nvidia-smi --query-gpu=utilization.gpu,memory.used -lms 200`` in a background process while a run goes on;
    each line stamped with this process' clock. ``why`` says why there are no samples (no nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, memory MiB)
        self.why = None if shutil.which("nvidia-smi") else "nvidia-smi not found"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "GpuSampler":
        if self.why is None:
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            self.proc = subprocess.Popen([*cmd, "-lms", str(SAMPLE_MS)], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:  # a header or "[N/A]"
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def summary(self, t0: float, t1: float) -> dict:
        """Mean utilisation and peak memory over [t0, t1], or why there are none."""
        inside = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not inside:
            return {"gpu_util_why": self.why or "no sample in the phase (shorter than the sampling interval)"}
        return {
            "gpu_util_mean": sum(u for u, _ in inside) / len(inside),
            "gpu_busy_share": sum(u > 0 for u, _ in inside) / len(inside),
            "gpu_mem_peak_mib": max(m for _, m in inside),
            "gpu_samples": len(inside),
        }


def engine_run(plate: str, out: Path, args, wells: list[str], null: bool, env: dict, workers: int | None) -> dict:
    """One ``scdino-engine run`` in a new process (``workers``: its ``--workers``, None: the engine's default); its
    stderr lines stamped to find the embedding phase."""
    cmd = [
        sys.executable, "-m", "scdino.engine.cli", "run", plate, "--out", str(out), "--labels", "nuclei",
        "--crop-size", str(args.crop_size), "--model", args.model, "--input-size", str(args.input_size),
        "--device", args.device, "--wells", ",".join(wells),
    ]  # fmt: skip
    if args.chunk_cells:
        cmd += ["--chunk-cells", str(args.chunk_cells)]
    if workers:
        cmd += ["--workers", str(workers)]
    env = {**env, "SCDINO_PROGRESS_SECONDS": "1", **({"SCDINO_NULL_BACKEND": "1"} if null else {})}
    lines: list[tuple[float, str]] = []
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in p.stderr:
            lines.append((time.perf_counter(), line.rstrip()))
        p.wait()
        t1 = time.perf_counter()
    if p.returncode:
        tail = "\n".join(text for _, text in lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{tail}")
    import anndata as ad

    a = ad.read_zarr(str(out))
    uns = a.uns["scdino"]
    timing = {k: float(v) for k, v in uns["timing"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    embed = [t for t, text in lines if "embedding:" in text]
    e0, e1 = (embed[0], embed[-1]) if len(embed) >= 2 else (t1 - timing.get("embed_seconds", 0.0), t1)
    return {
        "backend": f"{uns['backend']['kind']} on {uns['backend']['device']}",
        "workers": workers,
        "n_cells": int(a.n_obs),
        "wall_s": t1 - t0,
        "embed_s": timing.get("embed_seconds"),
        "timing": timing,
        "embed_window": "progress lines" if len(embed) >= 2 else "the last embed_seconds of the process",
        **gpu.summary(e0, e1),
    }


def settings(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="16384,49152", help="Two plate sizes (cells), the smaller first.")
    ap.add_argument("--field", type=int, default=2048, help="Field side in px (4,096 cells per 2048 px field).")
    ap.add_argument("--model", default="random:vit_small16")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--crop-size", type=int, default=32)
    ap.add_argument("--chunk-cells", type=int, help="Cells per block (default: the engine's).")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="null,model", help="null (the null backend), model, or both.")
    ap.add_argument("--workers", default="", help="Comma-separated --workers of the runs (default: the engine's).")
    ap.add_argument("--out", default="benchmarks/results/gpu_pipeline.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help="Tiny plate, CPU, ViT-test/16 at 32 px: < 60 s here.")
    ap.add_argument("--print-wheels", action="store_true", help="Print benchmarks/device/wheels.txt's NAME==VERSION.")
    args = ap.parse_args(argv)
    if not set(args.modes.split(",")) <= {"null", "model"}:
        ap.error(f"--modes {args.modes}: expected null, model or null,model")
    if args.cpu_dry_run:
        args.cells, args.field, args.model, args.input_size, args.device = (
            "256,768",
            256,
            "random:vit_test16",
            32,
            "cpu",
        )
        if args.out == ap.get_default("out"):
            args.out = "benchmarks/results/gpu_pipeline_cpu_dry_run.json"
    return args


def print_wheels() -> int:
    """The NAME==VERSION lines of benchmarks/device/wheels.txt (its comments left out)."""
    for line in WHEELS_TXT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            print(line.strip())
    return 0


def skipped(args, why: str) -> int:
    print(json.dumps({"benchmark": "gpu_pipeline", "status": "skipped", "why": why}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "gpu_pipeline", "status": "skipped", "why": why}, indent=1))
    return 0


def prepare(args, tmp: Path) -> tuple[dict, str | None]:
    """The environment runs get (scdino importable from this checkout if it is not installed) and why the model
    runs are skipped (None: they run)."""
    env = dict(os.environ)
    src = staged_source(ROOT, tmp / "src")
    if src is not None:
        sys.path.insert(0, str(src))
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
        print(f"scdino from this checkout ({src})", flush=True)
    import torch

    no_model = None
    if args.device == "cuda" and not torch.cuda.is_available():
        no_model, args.device = "no CUDA device visible to PyTorch", "cpu"
    return env, no_model


def steady(rows: list[dict], key: str) -> float | None:
    """Cells/s from the difference of the two sizes: (n2 - n1) / (t2 - t1); start-up and finishing cancel out. None
    with one size."""
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    dt = (b.get(key) or 0.0) - (a.get(key) or 0.0)
    return (b["n_cells"] - a["n_cells"]) / dt if dt > 0 else None


def measure(args, tmp: Path, env: dict, no_model: str | None) -> dict:
    from pipeline_ceiling import GRID, make_plate, raw_rate

    sizes = sorted(int(c) for c in args.cells.split(","))
    t = time.perf_counter()
    plate, n = make_plate(tmp / "plate.zarr", sizes[-1], args.field)
    per_field = (args.field // GRID) ** 2
    wells = [f"{chr(ord('A') + f // 24)}/{f % 24 + 1}" for f in range(n // per_field)]
    print(f"plate: {n} cells in {len(wells)} fields of {args.field} px ({time.perf_counter() - t:.0f} s)", flush=True)
    raw_s, raw_n = raw_rate(plate, os.cpu_count())
    res = {"raw_decode_cut_cells_per_s": raw_n / raw_s, "runs": [], "skipped": {}}
    workers = [int(w) for w in args.workers.split(",") if w] or [None]
    for null in [m == "null" for m in ("null", "model") if m in args.modes.split(",")]:
        mode = "null backend" if null else args.model
        if not null and no_model:
            res["skipped"][mode] = no_model
            print(f"{mode}: skipped ({no_model})", flush=True)
            continue
        for w in workers:
            rows = []
            for size in sizes:
                k = -(-size // per_field)
                out = tmp / f"{'null' if null else 'model'}{k}_w{w or 0}.zarr"
                r = engine_run(plate, out, args, wells[:k], null, env, w)
                rows.append({"mode": mode, **r})
                on = f", {w} worker{'s' if w > 1 else ''}" if w else ""
                print(f"{mode}: {r['n_cells']} cells in {r['wall_s']:.1f} s ({r['backend']}{on})", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            for key, name in (("wall_s", "steady_run_cells_per_s"), ("embed_s", "steady_embed_cells_per_s")):
                rows[-1][name] = steady(rows, key)
            res["runs"] += rows
    return res


def report(args, res: dict) -> Path:
    """Print the table and write the JSON (``write_results`` imports ``scdino.cpu``: scdino must still import)."""
    for r in res["runs"]:
        r["cells_per_s"] = r["n_cells"] / r["wall_s"]
        r["embed_cells_per_s"] = r["n_cells"] / r["embed_s"] if r.get("embed_s") else None
    print(f"\nraw decode + cut on {os.cpu_count()} cores: {res['raw_decode_cut_cells_per_s']:.0f} cells/s\n")
    print_table(
        res["runs"],
        [
            ("run", "mode", "s"), ("backend", "backend", "s"), ("workers", "workers", "d"), ("cells", "n_cells", "d"),
            ("s", "wall_s", ".1f"), ("cells/s", "cells_per_s", ".0f"),
            ("embedding phase, cells/s", "embed_cells_per_s", ".0f"),
            ("steady cells/s (difference)", "steady_run_cells_per_s", ".0f"),
            ("steady embedding cells/s", "steady_embed_cells_per_s", ".0f"),
            ("GPU util % (embedding)", "gpu_util_mean", ".0f"), ("GPU mem MiB", "gpu_mem_peak_mib", ".0f"),
        ],
    )  # fmt: skip
    for r in res["runs"]:
        if "gpu_util_why" in r:
            print(f"GPU utilisation of '{r['mode']}' at {r['n_cells']} cells: skipped ({r['gpu_util_why']})")
            break
    keys = ("cells", "field", "model", "input_size", "crop_size", "chunk_cells", "modes", "workers")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    res = {
        "benchmark": "gpu_pipeline",
        "settings": {**{k: getattr(args, k) for k in keys}, "device": args.device},
        **res,
    }
    return write_results(args.out, {**res, "machine": machine(gpu=gpu, cuda=torch.version.cuda)})


def main(argv: list[str] | None = None) -> int:
    args = settings(argv)
    if args.print_wheels:
        return print_wheels()
    problem = unimportable(NEEDED)
    if problem:
        return skipped(args, f"{problem[0]}; the wheels a device machine needs: benchmarks/device/wheels.txt")
    tmp = Path(tempfile.mkdtemp(prefix="scdino-gpu-pipeline-"))
    try:
        env, no_model = prepare(args, tmp)
        from scdino._optional import MissingDependencyError

        try:
            res = measure(args, tmp, env, no_model)
        except MissingDependencyError as exc:  # the plate writer's optional packages
            return skipped(args, str(exc))
        path = report(args, res)  # before the staged copy of scdino goes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
