#!/usr/bin/env bash
# One-shot GPU check of semfid, < 8 minutes on an H100. Run from anywhere inside a copy of the repo:
#
#     bash benchmarks/gpu_check.sh            # logs, JSON and PNGs go to $OUT (else ./gpu_check_out)
#
# Steps, each bounded by `timeout` and run even when an earlier one failed:
#   1. environment (nvidia-smi, versions)
#   2. pip install --no-build-isolation --no-deps -e . with the CUDA extension built for this GPU's
#      arch (SEMFID_BUILD_CUDA=1, SEMFID_CUDA_ARCHS=<detected>); if that fails, a pure-Python install
#   3. python -m semfid.info, then pytest -m gpu
#   4. copy bandwidth (the roofline attn_speed reports against)
#   5. benchmarks/attn_speed.py: every SD1.5/SDXL cross-attention shape, batch 2 and 8, fp16
#   6. benchmarks/train_step.py (needs diffusers: wheels in $SEMFID_WHEELS, benchmarks/wheels/ or
#      .whl/ are installed with --no-index first; without them the step is skipped, saying so).
#      The GPU image lacks only diffusers and importlib_metadata; fetch them where pip has network:
#        python3 -m pip download --no-deps -d benchmarks/wheels diffusers==0.42.1 importlib_metadata
#   7. a short summary table (also $OUT/summary.txt)
#
# GPU_CHECK_SKIP_INSTALL=1 skips step 2 (semfid already installed); GPU_CHECK_BUDGET_S changes the
# total time budget (default 465 s).
#
# Written for the GPU image: Python 3.12, torch 2.11, triton 3.6, no network, no diffusers.
# Files in $OUT (8 at most come back from a device run): gpu_check.log, attn_speed.json,
# attn_speed.png, train_step.json, summary.txt.

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
OUT_DIR="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
TOTAL_BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"  # leave headroom under 8 minutes
T0=$(date +%s)
STATUS=()

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout` (never past the total budget), logs it,
# records "NAME: ok|FAILED (rc)|TIMED OUT|skipped  (seconds)".
run_step() {
    local name="$1" limit="$2"; shift 2
    local left=$(( TOTAL_BUDGET_S - $(elapsed) ))
    if (( left < 15 )); then
        STATUS+=("$name: skipped (total time budget spent)"); say "=== $name: skipped, no time left"; return 99
    fi
    (( limit > left )) && limit=$left
    say ""
    say "=== [$(elapsed)s] $name (limit ${limit}s): $*"
    local start=$(date +%s) rc
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    case $rc in
        0) STATUS+=("$name: ok (${took}s)") ;;
        124|137) STATUS+=("$name: TIMED OUT after ${took}s") ;;
        *) STATUS+=("$name: FAILED rc=$rc (${took}s)") ;;
    esac
    return $rc
}

# ---- 1. environment --------------------------------------------------------------------------
run_step env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
    command -v nvcc && nvcc --version | tail -n 2; \
    $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda)'; \
    $PY -c 'import triton; print(\"triton\", triton.__version__)'"

ARCH=$($PY -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}")' 2>/dev/null || echo "")
say "detected compute capability: ${ARCH:-none}"

# ---- 2. install (CUDA extension for this arch; pure Python as the fallback) ------------------
if [[ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]]; then
    say "GPU_CHECK_SKIP_INSTALL is set: using the semfid already importable"
elif [[ -n "$ARCH" ]]; then
    run_step install_cuda 240 env SEMFID_BUILD_CUDA=1 SEMFID_CUDA_ARCHS="$ARCH" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
        || run_step install_python 90 env SEMFID_BUILD_CUDA=0 \
            $PY -m pip install --no-build-isolation --no-deps --no-index -e .
else
    say "no CUDA device visible: installing without the extension"
    run_step install_python 90 env SEMFID_BUILD_CUDA=0 \
        $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi

# ---- 3. what is usable, then the GPU tests ---------------------------------------------------
run_step semfid_info 30 $PY -m semfid.info
run_step pytest_gpu 100 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests

# ---- 4. copy bandwidth -----------------------------------------------------------------------
run_step bandwidth 30 $PY -c "
import sys, torch; sys.path.insert(0, 'benchmarks')
from _bench_utils import copy_bandwidth_gbs
print(f'device-to-device copy: {copy_bandwidth_gbs(torch.device(\"cuda\")):.0f} GB/s (read + write)')"

# ---- 5. attention benchmark ------------------------------------------------------------------
run_step attn_speed 170 $PY benchmarks/attn_speed.py --device cuda --dtype float16 \
    --rep-ms 40 --compile-budget-s 60 --no-progress \
    --json "$OUT_DIR/attn_speed.json" --plot "$OUT_DIR/attn_speed.png"

# ---- 6. whole training step (needs diffusers) --------------------------------------------------
WHEELS=""
for d in "${SEMFID_WHEELS:-}" benchmarks/wheels .whl; do
    if [[ -n "$d" ]] && compgen -G "$d/*.whl" >/dev/null; then WHEELS="$d"; break; fi
done
if [[ -n "$WHEELS" ]]; then
    run_step wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/semfid_site \
        "$WHEELS"/*.whl && export PYTHONPATH="/tmp/semfid_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if $PY -c 'import diffusers' >/dev/null 2>&1; then
    run_step train_step 150 $PY benchmarks/train_step.py --device cuda --size full --dtype bfloat16 \
        --batch 2 --steps 4 --warmup 1 --json "$OUT_DIR/train_step.json"
else
    STATUS+=("train_step: skipped (diffusers is not installed here and no wheel was provided in \
\$SEMFID_WHEELS, benchmarks/wheels/ or .whl/)")
    say "=== train_step skipped: no diffusers (put diffusers + importlib_metadata wheels in benchmarks/wheels/)"
fi

# ---- 7. summary --------------------------------------------------------------------------------
{
    echo ""
    echo "=== gpu_check summary ($(elapsed)s total) ==="
    for s in "${STATUS[@]}"; do echo "  $s"; done
    $PY - "$OUT_DIR" <<'EOF'
import json, os, sys
out = sys.argv[1]
path = os.path.join(out, "attn_speed.json")
if os.path.exists(path):
    recs = json.load(open(path))
    idx = {(r["case"], r["batch"], r["mode"], r["impl"]): r for r in recs}
    print("\nattn_speed, subject_fwd_bwd, ms (semfid speedup over the baseline):")
    others = [i for i in ("eager", "sdpa_augmented_v", "xformers", "eager_compiled", "sdpa_floor")
              if any(k[3] == i for k in idx)]
    print(f"  {'case':8} {'B':>2} {'semfid':>9} {'GB/s (%copy)':>13} " + " ".join(f"{o:>22}" for o in others))
    for (case, batch, mode, impl), r in sorted(idx.items()):
        if mode != "subject_fwd_bwd" or impl != "semfid":
            continue
        cells = []
        for o in others:
            t = idx.get((case, batch, mode, o))
            cells.append("-" if t is None else f"{t['ms_median']:.3f} ({t['ms_median'] / r['ms_median']:.2f}x)")
        bw = "-" if r.get("gbps") is None else f"{r['gbps']:.0f} ({r.get('pct_copy_bandwidth') or 0:.0f}%)"
        print(f"  {case:8} {batch:>2} {r['ms_median']:>9.3f} {bw:>13} " + " ".join(f"{c:>22}" for c in cells))
path = os.path.join(out, "train_step.json")
if os.path.exists(path):
    print("\ntrain_step (ms per step, loss cost over the no-loss floor):")
    for r in json.load(open(path)):
        over = r.get("overhead_vs_floor_pct")
        print(f"  {r['model']:5} {r['res']:>5}px B={r['batch']} {r['variant']:9} {r['ms_median']:9.1f} ms  "
              f"peak {r.get('peak_mib') or 0:8.0f} MiB  " + ("" if over is None or r["variant"] == "floor" else f"{over:+.1f}%"))
EOF
} 2>&1 | tee "$OUT_DIR/summary.txt" | tee -a "$LOG"

for s in "${STATUS[@]}"; do [[ "$s" == *FAILED* || "$s" == *"TIMED OUT"* ]] && exit 1; done
exit 0
