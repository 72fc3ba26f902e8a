#!/usr/bin/env bash
# The device recipe on this machine: a stand-in for the device image, then run.sh --cpu-dry-run in it.
#
#   bash benchmarks/device/simulate.sh            # from the repository root (any folder of the checkout will do)
#
# 1. The stand-in: a Python 3.12 venv holding the image's packages marked "# sim" in image.txt, at the image's
#    versions where image.txt gives one (torch 2.11.0, numpy 2.5.2, pandas 3.1.1, onnx 1.23.1, onnxruntime 1.30.0),
#    else the current release, with their requirements, and nothing else: every distribution in it must be named in
#    image.txt, or the script stops. Torch 2.11.0 for Python 3.12 from the package index is the CUDA build with its
#    nvidia-* packages, as on the image; it imports and runs on a CPU. Made once per package list, in
#    $SCDINO_DEVICE_SIM (default ~/.cache/scdino-device-sim; about 5.4 GB); later runs reuse it, and one made for an
#    older list is removed when a new one is made.
# 2. A clean clone of this checkout's committed HEAD in a temporary folder, the wheels of wheels.txt copied into its
#    .whl/ (fetched into this checkout's .whl/ first where missing: fetch_wheels.sh), held to wheels.txt.
# 3. In the clone, with no pip configuration (no index, no extra wheel folders: only .whl/), no PYTHONPATH and the
#    stand-in's python3 first on PATH: bash benchmarks/device/run.sh --cpu-dry-run. Its files land in
#    $SCDINO_DEVICE_SIM/out (or $OUT where set); what it installs goes into the temporary folder, removed at the end.
#    The script's status is run.sh's: 0 when no step failed or timed out.
#
# PY312 names the Python 3.12 to build the venv with (default: python3.12 on PATH, else one of pyenv's 3.12).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel)
cache=${SCDINO_DEVICE_SIM:-$HOME/.cache/scdino-device-sim}
py312=${PY312:-}
for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [[ -z $py312 ]] && "$c" -c '' 2>/dev/null && py312=$c
done
[[ -n $py312 ]] || { echo "simulate.sh: no Python 3.12 found; set PY312" >&2; exit 1; }
t_start=$SECONDS
mkdir -p "$cache"

# --- 1. the stand-in for the image ------------------------------------------------------------------------------
# "# sim" lines of image.txt as requirements: NAME==VERSION where the image's version is known, else NAME
sim_reqs=$(sed -n 's/^\([^#[:space:]]*\)[[:space:]]*#[[:space:]]*sim\b.*/\1/p' "$here/image.txt")
key=$( { "$py312" -V; echo "$sim_reqs"; } | sha256sum | cut -c1-12)
venv=$cache/venv-$key
if [[ ! -f $venv/.complete ]]; then
    echo "== building the stand-in for the device image in $venv (once per package list; minutes)"
    find "$cache" -maxdepth 1 -name 'venv-*' -exec rm -rf {} +
    "$py312" -m venv "$venv"
    # pip is in the image at an unread version: the current release stands in for it
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -qq --upgrade $sim_reqs
    touch "$venv/.complete"
else
    echo "== the stand-in for the device image: $venv (made before)"
fi
# nothing else: every distribution in the venv is one the image has
"$venv/bin/python" -I - "$here/image.txt" <<'EOF'  # -I: not the folder it runs from (a checkout may hold scdino.egg-info)
import re
import sys
from importlib.metadata import distributions

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
image = {norm(re.split(r"[=<>!~\s#]", line, maxsplit=1)[0]) for line in open(sys.argv[1]) if line[:1].isalnum()}
have = {norm(d.metadata["Name"]): d.version for d in distributions()}
extra = sorted(f"{n}=={v}" for n, v in have.items() if n not in image)
if extra:
    sys.exit(f"the stand-in holds packages the device image lacks: {', '.join(extra)}")
print(f"   {len(have)} distributions, all in image.txt: " + ", ".join(
    f"{n} {have[n]}" for n in ("torch", "numpy", "pandas", "onnx", "onnxruntime", "scipy", "scikit-image", "pip")
))
EOF

# --- 2. a clean clone with the wheels ---------------------------------------------------------------------------
whl=$root/.whl
if ! "$py312" "$here/check_wheels.py" --quiet "$whl" 2>/dev/null; then
    bash "$here/fetch_wheels.sh"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/scdino-device-sim.XXXXXX")
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/repo"
mkdir "$work/repo/.whl"
cp "$whl"/*.whl "$work/repo/.whl/"
echo "== clean clone of $(git -C "$work/repo" log -1 --format='%h %s' | cut -c1-80)"
"$py312" "$work/repo/benchmarks/device/check_wheels.py" "$work/repo/.whl"

# --- 3. run.sh --cpu-dry-run as on the device --------------------------------------------------------------------
out=${OUT:-$cache/out}
rm -rf "$out"
mkdir -p "$out"
t_run=$SECONDS
set +e
(
    cd "$work/repo"
    env -i HOME="$HOME" PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 TMPDIR="${TMPDIR:-/tmp}" \
        PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 OUT="$out" SCDINO_SITE="$work/site" \
        bash benchmarks/device/run.sh --cpu-dry-run
)
rc=$?
set -e
echo "== simulate.sh: run.sh exited $rc after $((SECONDS - t_run)) s; $((SECONDS - t_start)) s in all; files in $out"
exit $rc
