#!/usr/bin/env bash
# The GPU checks of a device machine in one go, within 8 minutes: run from the repository root there, with the wheels
# of wheels.txt in .whl/ (bash benchmarks/device/fetch_wheels.sh here; the device call carries .whl).
#
#   bash benchmarks/device/run.sh                  # on the device machine
#   bash benchmarks/device/run.sh --cpu-dry-run    # the same steps on a CPU, tiny sizes (simulate.sh runs this)
#
# 1. installs the wheels (setuptools and wheel aside: those only build scdino) and then scdino itself, both with
#    --no-deps --no-index, into $SCDINO_SITE (default /tmp/scdino-device-site), never into the image's own Python, and
#    puts that folder first on PYTHONPATH (the engine's Dask workers inherit it);
# 2. runs each step under its own timeout (its limit, or what is left of the budget: $SCDINO_DEVICE_SECONDS, 480 s
#    in all; 1200 s and three times each limit with --cpu-dry-run, for a slow CPU), in order of value, going on to the
#    next whatever happens to one:
#      gpu_check       benchmarks/gpu_check.py --quick: the device checks (preprocessing, backend, k-NN, training,
#                      NCCL, ONNX Runtime, TensorRT where installed)
#      gpu_pipeline    benchmarks/gpu_pipeline.py: the whole scdino-engine run --device cuda at two plate sizes, null
#                      backend and ViT-S/16 at 224 px, GPU utilisation sampled by nvidia-smi
#      gpu_precision   benchmarks/gpu_precision.py: fp16 against bf16 autocast, cosine and k-NN agreement to CPU fp32
#                      on the labelled Jurkat cells
#      gpu_workers     benchmarks/gpu_pipeline.py --modes model --workers 1,4: one worker against four on one GPU
#      pipeline_ceiling  benchmarks/pipeline_ceiling.py --threads 1,N: the null-backend ceiling on all N cores
#    A step whose packages do not import is skipped (or, where an installed one fails to import, marked failed) with
#    one line naming the package (needs.py), never a traceback;
# 3. writes to $OUT (default benchmarks/results/device, or device_cpu_dry_run): run.log (everything printed), one JSON
#    per step (STEP.json) and summary.json (each step's status, seconds and reason): 7 files, within the 8 that come
#    back from a device call; prints the summary. Exits 1 where a step failed or timed out, else 0 (skips included).
#
# --no-install runs the steps in the Python as it is (one that has scdino and its packages already), --only STEP,...
# runs only the steps named. PYTHON names the interpreter (default python3: the image's, the one that holds PyTorch).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2

dry=0 no_install=0 only=""
while (($#)); do
    case $1 in
    --cpu-dry-run) dry=1 ;;
    --no-install) no_install=1 ;;
    --only)
        only=,$2,
        shift
        ;;
    *)
        echo "usage: bash benchmarks/device/run.sh [--cpu-dry-run] [--no-install] [--only STEP,...]" >&2
        exit 2
        ;;
    esac
    shift
done
py=${PYTHON:-python3}
if ((dry)); then
    OUT=${OUT:-benchmarks/results/device_cpu_dry_run}
    budget=${SCDINO_DEVICE_SECONDS:-1200}
    scale=3
else
    OUT=${OUT:-benchmarks/results/device}
    budget=${SCDINO_DEVICE_SECONDS:-480}
    scale=1
fi
site=${SCDINO_SITE:-/tmp/scdino-device-site}
cores=$(nproc)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
statuses=$(mktemp)
trap 'rm -f "$statuses"' EXIT

record() { # record NAME STATUS SECONDS WHY
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$statuses"
}

install() {
    local t0=$SECONDS rc why wheels=() w pip=("$py" -m pip install -q --disable-pip-version-check --no-index --no-deps
        --no-cache-dir --target "$site")
    shopt -s nullglob
    for w in .whl/*.whl; do
        case ${w##*/} in
        setuptools-* | wheel-*) ;; # build requirements of scdino only: pip's build isolation finds them in .whl/
        *) wheels+=("$w") ;;
        esac
    done
    shopt -u nullglob
    rm -rf "$site"
    mkdir -p "$site"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$site/bin:$PATH
    if ((${#wheels[@]} == 0)); then
        why="no wheels in .whl/ (bash benchmarks/device/fetch_wheels.sh here, and carry .whl)"
    else
        echo "== install: ${#wheels[@]} wheels and scdino into $site"
        # one pip call (a second one into the same --target leaves out what the first made there, bin/ say); scdino
        # is built from this tree, with setuptools>=77 and wheel from .whl/ where the image's setuptools is older
        timeout 150 "${pip[@]}" --find-links .whl "${wheels[@]}" .
        rc=$?
        if ((rc == 0)); then
            record install ok $((SECONDS - t0)) ""
            return
        fi
        why="pip install exited $rc; the wheels alone, and scdino from the source tree"
        rm -rf "$site"
        mkdir -p "$site"
        timeout 60 "${pip[@]}" "${wheels[@]}"
    fi
    # the steps go on with scdino from this tree: src/scdino with the stage folders as its subpackages
    cp -r src/scdino "$site/scdino"
    for w in engine export training; do ln -s "$PWD/$w" "$site/scdino/$w"; done
    record install failed $((SECONDS - t0)) "$why"
    echo "== install: failed ($why)"
}

step() { # step NAME SECONDS "MODULES" COMMAND...: COMMAND under its own timeout, once every one of MODULES imports
    local name=$1 limit=$(($2 * scale)) needs=$3 left why rc status t0=$SECONDS
    shift 3
    [[ -z $only || $only == *",$name,"* ]] || return 0
    left=$((budget - (SECONDS - t_start) - 5))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        why="not started: $((left + 5)) s of the $budget s budget left"
        record "$name" skipped 0 "$why"
        echo "== $name: skipped ($why)"
        return
    fi
    # shellcheck disable=SC2086
    why=$(timeout "$limit" "$py" benchmarks/device/needs.py $needs 2>&1)
    rc=$?
    if ((rc)); then
        why=$(tail -n 1 <<<"$why")
        status=$([[ $rc == 3 ]] && echo skipped || echo failed)
        record "$name" "$status" $((SECONDS - t0)) "$why"
        echo "== $name: $status ($why)"
        return
    fi
    limit=$((limit - (SECONDS - t0)))
    ((limit < 5)) && limit=5 # timeout 0 would mean none
    echo "== $name (at most $limit s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    case $rc in
    0) status=ok why="" ;;
    124 | 137) status="timed out" why="stopped after $limit s" ;;
    *) status=failed why="exit status $rc" ;;
    esac
    record "$name" "$status" $((SECONDS - t0)) "$why"
    echo "== $name: $status after $((SECONDS - t0)) s${why:+ ($why)}"
}

summary() {
    "$py" - "$statuses" "$OUT/summary.json" "$budget" "$((SECONDS - t_start))" "$dry" <<'EOF'
import json
import sys

path, out, budget, seconds, dry = sys.argv[1:]
steps = []
for line in open(path):
    name, status, secs, why = line.rstrip("\n").split("\t")
    steps.append({"step": name, "status": status, "seconds": int(secs), **({"why": why} if why else {})})
res = {"run": "benchmarks/device/run.sh", "cpu_dry_run": dry == "1", "budget_s": int(budget), "seconds": int(seconds),
       "steps": steps}
json.dump(res, open(out, "w"), indent=1)
print(f"\n== summary ({seconds} s of the {budget} s budget)")
for s in steps:
    print(f"{s['step']:<16} {s['status']:<9} {s['seconds']:>4} s  {s.get('why', '')}".rstrip())
EOF
}

main() {
    t_start=$SECONDS
    echo "== run.sh$( ((dry)) && echo ' --cpu-dry-run') on $(hostname), $(date -u +%FT%TZ): $("$py" -V 2>&1)," \
        "$cores cores, budget $budget s, files in $OUT"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ((no_install)) || install
    local dr=() engine="numpy torch zarr dask.array distributed anndata skimage psutil scdino.engine.pipeline"
    ((dry)) && dr=(--cpu-dry-run)
    export PYTHONUNBUFFERED=1
    step gpu_check 100 "numpy torch scdino.engine.backends.torch_backend scdino.training.loop" \
        "$py" benchmarks/gpu_check.py --quick --out "$OUT/gpu_check.json"
    step gpu_pipeline 130 "$engine ome_zarr.writer ome_zarr.format" \
        "$py" benchmarks/gpu_pipeline.py "${dr[@]}" --out "$OUT/gpu_pipeline.json"
    step gpu_precision 70 "numpy torch zarr anndata scdino.cells.cropstore scdino.engine.backends.torch_backend" \
        "$py" benchmarks/gpu_precision.py "${dr[@]}" --out "$OUT/gpu_precision.json"
    step gpu_workers 100 "$engine ome_zarr.writer ome_zarr.format" \
        "$py" benchmarks/gpu_pipeline.py "${dr[@]}" --modes model --workers 1,4 --out "$OUT/gpu_workers.json"
    local size=(--cells 49152)
    ((dry)) && size=(--cells 512 --field 256)
    step pipeline_ceiling 60 "$engine ome_zarr.writer scdino.engine.sample" \
        "$py" benchmarks/pipeline_ceiling.py "${size[@]}" --threads "1,$cores" --out "$OUT/pipeline_ceiling.json"
    summary
    ! grep -qP '\t(failed|timed out)\t' "$statuses"
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
