"""Where scdino-train's memory and time go: a few steps of each setting on real Jurkat cells, each in its own process.

Per setting: resident memory after the networks and optimiser are built and at its peak over the steps (sampled every
10 ms), seconds per step (the first step excluded), the allocations of one step by operator (torch profiler,
``profile_memory``), and what :func:`scdino.training.estimate.estimate` predicted before the first step. Settings:

- ``defaults``: the scDINO recipe on a ViT-tiny/8 (a 65,536-wide head, 2 global views at 224 px and 8 local views at
  96 px, 30 crops a step, fp32);
- ``defaults, activation checkpointing``: the same with ``activation_checkpointing=true``;
- ``cpu preset``: the CPU-sized preset of docs/training.md (two views at the crops' own 40 px, no local crops, a
  4,096-wide head, 64 crops a step).

    python benchmarks/train_memory.py [--steps 3] [--settings defaults,checkpointing,cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import machine, print_table, write_results

DATA = Path(__file__).parent / "data" / "jurkat_cellcycle" / "train.zarr"
DEFAULTS = ["precision=fp32"]
#: docs/training.md, "A CPU-sized preset"
CPU_PRESET = [
    "precision=fp32",
    "global_size=40",
    "local_size=24",
    "local_crops=0",
    "out_dim=4096",
    "batch_size_per_device=64",
]
SETTINGS = {
    "defaults": DEFAULTS,
    "checkpointing": DEFAULTS + ["activation_checkpointing=true"],
    "cpu": CPU_PRESET,
}
LABELS = {
    "defaults": "defaults",
    "checkpointing": "defaults, activation checkpointing",
    "cpu": "cpu preset",
}


def one(name: str, steps: int) -> dict:
    """Build the trainer of setting ``name`` on the Jurkat training cells and run ``steps`` steps (in this process)."""
    import psutil
    import torch

    from scdino.training import loop
    from scdino.training.config import build_config
    from scdino.training.data import epoch_order
    from scdino.training.estimate import estimate

    proc = psutil.Process()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"scdino-train-memory-{os.getpid()}"
    cfg = build_config(
        None, SETTINGS[name], data=str(DATA), out=str(out), arch="vit_tiny", patch=8, epochs=1, device="cpu"
    )
    data = loop.prepare_data(cfg)
    rss_data = proc.memory_info().rss
    tr = loop.build(cfg, data)
    est = estimate(tr.cfg, tr.data.crops, tr.n_iter)
    rss_built = proc.memory_info().rss
    peak = [rss_built]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    order = epoch_order(len(tr.data.crops), 0, cfg.seed)
    times = []
    for it in range(steps):
        t = time.perf_counter()
        loop._step(tr, 0, it, order, None)
        times.append(time.perf_counter() - t)
    stop.set()
    th.join()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loop._step(tr, 0, steps, order, None)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_memory_usage)[:8]
    return {
        "setting": LABELS[name],
        "set": SETTINGS[name],
        "crops_per_step": cfg.batch_size_per_device,
        "steps_per_epoch": tr.n_iter,
        "rss_data_gb": rss_data / 1e9,
        "rss_built_gb": rss_built / 1e9,
        "rss_peak_gb": peak[0] / 1e9,
        "step_seconds": times,
        "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "epoch_minutes": tr.n_iter * sum(times[1:]) / max(1, len(times) - 1) / 60,
        "estimate": est,
        "top_allocations_gb": {e.key: e.self_cpu_memory_usage / 1e9 for e in ops},
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_memory.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.steps)))
        return
    rows = []
    for name in args.settings.split(","):
        r = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps)], capture_output=True, text=True
        )
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no result'}")
        row = json.loads(line[len("RESULT ") :])
        row["estimated_peak_gb"] = row["estimate"]["peak_gb"]
        row["estimated_seconds_per_step"] = row["estimate"]["seconds_per_step"]
        rows.append(row)
        print(f"{row['setting']}: top allocations of one step (GB): {row['top_allocations_gb']}", flush=True)
    print()
    print_table(
        rows,
        [
            ("setting", "setting", "s"),
            ("resident after build, GB", "rss_built_gb", ".2f"),
            ("peak resident, GB", "rss_peak_gb", ".2f"),
            ("estimated peak, GB", "estimated_peak_gb", ".2f"),
            ("s / step", "seconds_per_step", ".2f"),
            ("estimated s / step", "estimated_seconds_per_step", ".2f"),
            ("min / epoch (2,064 cells)", "epoch_minutes", ".1f"),
        ],
    )
    write_results(args.out, {"benchmark": "train_memory", "data": str(DATA), "results": rows, "machine": machine()})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
