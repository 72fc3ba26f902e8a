"""Whether the modules named on the command line import here: silent with status 0 where they all do; else one line
saying which package is missing (status 3: the step that needs it is skipped) or which installed one fails to import
(status 4: the step failed). run.sh asks it before each step.

    python benchmarks/device/needs.py torch zarr ome_zarr.writer
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import unimportable  # noqa: E402

if __name__ == "__main__":
    problem = unimportable(sys.argv[1:])
    if problem:
        print(problem[0])
        sys.exit(3 if problem[1] else 4)
