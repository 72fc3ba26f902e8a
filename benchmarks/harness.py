"""What every benchmark shares: the machine description and writing the results JSON. Imported by the scripts beside
it (``python benchmarks/NAME.py`` puts this folder on the path); never by the library or the tests."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def machine(**extra) -> dict:
    """Cores, platform, Python, the CPU's int8/bf16 flags, and torch's version where torch is loaded; plus ``extra``."""
    from scdino.cpu import BF16_FLAGS, VNNI_FLAGS, cpu_flags

    flags = cpu_flags()
    out = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "cpu_flags": sorted(f for f in flags if f in (*VNNI_FLAGS, *BF16_FLAGS) or f.startswith("avx")),
    }
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return {**out, **extra}


def write_results(path: str | os.PathLike, res: dict, indent: int = 1) -> Path:
    """Write ``res`` (with ``machine`` and ``time`` added where missing) as JSON to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = {
        **res,
        "machine": res.get("machine") or machine(),
        "time": res.get("time") or time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.write_text(json.dumps(res, indent=indent, default=str))
    return path
