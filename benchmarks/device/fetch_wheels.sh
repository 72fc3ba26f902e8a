#!/usr/bin/env bash
# Download the wheels of wheels.txt into .whl/ at the repository root, for a device machine's Python 3.12 (CPython,
# manylinux x86_64), have git ignore that folder, and hold it to wheels.txt (check_wheels.py: versions, tags, every
# requirement met, tree + wheels within the 64 MiB that travel). Wheels not on the list are removed from .whl/.
#
#   bash benchmarks/device/fetch_wheels.sh
#
# PY312 names the Python whose pip downloads (default: python3.12 on PATH, else one of pyenv's 3.12; its pip's
# target is set by --python-version and --platform, not by the Python it runs in).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel)
py=${PY312:-}
for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [[ -z $py ]] && "$c" -c '' 2>/dev/null && py=$c
done
[[ -n $py ]] || { echo "fetch_wheels.sh: no Python 3.12 found; set PY312" >&2; exit 1; }
whl=$root/.whl

# ignored by git in this checkout and every worktree of it (the common git folder's info/exclude)
exclude=$(git -C "$root" rev-parse --path-format=absolute --git-common-dir)/info/exclude
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"

mkdir -p "$whl"
t=$SECONDS
"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$whl" -r "$here/wheels.txt"
# keep only the listed versions: two wheels of one package stop the whole install
"$py" - "$here/wheels.txt" "$whl" <<'EOF'
import re
import sys
from pathlib import Path

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
pins = {}
for line in open(sys.argv[1]):
    if line[:1].isalnum():
        name, _, version = line.split("#")[0].strip().partition("==")
        pins[norm(name)] = version
for w in Path(sys.argv[2]).glob("*.whl"):
    name, version = w.name.split("-")[:2]
    if pins.get(norm(name)) != version:
        print(f"removed {w.name}: not on wheels.txt")
        w.unlink()
EOF
echo "downloaded in $((SECONDS - t)) s"
"$py" "$here/check_wheels.py" "$whl"
