"""What every benchmark shares: the machine description and writing the results JSON. Imported by the scripts beside
it (``python benchmarks/NAME.py`` puts this folder on the path); never by the library or the tests."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable
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


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a markdown table: ``columns`` are (header, key, format spec); a missing or None value is
    printed as a dash."""
    print("| " + " | ".join(h for h, _, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [("-" if r.get(k) is None else format(r[k], f)) for _, k, f in columns]
        print("| " + " | ".join(cells) + " |")


def staged_source(root: Path, into: Path) -> Path | None:
    """Where ``import scdino.engine`` works from a plain source tree (a device machine that got the checkout, not an
    install): ``into/scdino`` is a copy of ``src/scdino`` with the stage folders linked in as its subpackages, as
    pyproject.toml's package-dir maps them. Put the returned folder on ``sys.path`` and ``PYTHONPATH`` (Dask's worker
    processes import it too). None where scdino is installed already."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("scdino") is not None:
        return None
    pkg = into / "scdino"
    shutil.copytree(root / "src" / "scdino", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for stage in ("engine", "export", "training"):
        (pkg / stage).symlink_to(root / stage, target_is_directory=True)
    return into


def unimportable(modules: Iterable[str]) -> tuple[str, bool] | None:
    """Why the first of ``modules`` that cannot be imported here cannot, in one line, and whether that is a missing
    package (a module not found: the module itself, or one it imports, which names the requirement an installed
    package lacks) rather than a broken one; None where all of them import."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            gone = (exc.name or module).split(".")[0]
            via = "" if gone == module.split(".")[0] else f" (needed by {module})"
            return f"{gone} is not installed{via}", True
        except Exception as exc:  # an installed package that fails to import: a version that does not fit
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"{module} cannot be imported: {type(exc).__name__}: {first}", False
    return None
