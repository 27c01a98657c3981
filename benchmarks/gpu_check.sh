#!/usr/bin/env bash
# The one script a GPU session runs: < 8 minutes on an H100/H200. From anywhere inside a copy of the repo:
#
#     bash benchmarks/gpu_check.sh             # logs, JSON, PNG and the verdict go to $OUT (else ./gpu_check_out)
#     bash benchmarks/gpu_check.sh --dry-run   # CPU: every step reports; what needs CUDA is skipped, saying so
#
# Without a CUDA GPU the dry mode is chosen by itself. Steps, in this order (a short window catches the
# most), each bounded by `timeout` and run even when an earlier one failed:
#   1. env            nvidia-smi, nvcc, a C compiler (Triton's launcher), compute-sanitizer, versions
#   2. selftest       python -m semfid.selftest --backend triton|sdpa --ship $OUT/verdicts/ (cuda after step 5)
#   3. pytest_gpu_*   pytest -m gpu, one process per test file (the key-blocked Triton kernels on DiT layers too)
#      triton_joint_probe   benchmarks/triton_joint_probe.py: each DiT case in its own process, memcheck on a fault
#      triton_joint   benchmarks/triton_joint_timing.py: Flux / SD3 / PixArt-Σ layers, fwd+bwd vs SDPA
#   4. library_cuda   opcheck + torch.compile with diffusers' transposed views, on CUDA
#   5. cuda_build     the CUDA extension for the detected arch (setup.py build_ext --inplace)
#      cuda_tests     its tests, and the op suites against backend=cuda
#   6. memcheck, racecheck   compute-sanitizer on benchmarks/sanitizer_case.py (N=130, M=77, every head dim)
#   7. attn_speed     the timing table (every SD1.5/SDXL cross-attention shape, batch 2 and 8, fp16)
#   8. train_step     only where diffusers is importable (not in the GPU image); GPU_CHECK_COMPILE=1 adds
#                     the torch.compile'd steps (modes default and reduce-overhead), recompiles counted
#   9. summary        $OUT/summary.txt, and the verdict file to commit
#
# GPU image: Python 3.12, torch 2.11 (cu130), triton 3.6, no diffusers, no network: nothing here
# installs or downloads. GPU_CHECK_BUDGET_S changes the total time budget (default 465 s).
# Files in $OUT (8 at most come back from a device run): gpu_check.log, summary.txt, attn_speed.json,
# attn_speed.png, verdicts/*.json, train_step.json.

set -u -o pipefail
DRY=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY="requested (--dry-run)" ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
OUT_DIR="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
# The checkout's semfid, whatever is installed (benchmarks/*.py put benchmarks/ first on sys.path).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
TOTAL_BUDGET_S="${GPU_CHECK_BUDGET_S:-465}"  # headroom under 8 minutes
T0=$(date +%s)
STATUS=()
VERDICTS="$OUT_DIR/verdicts"  # the self-tests' --ship output: <backend>-<gpu>.json each

if [[ -z "$DRY" ]] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    DRY="no CUDA GPU visible to torch"
fi

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

# skip_step NAME WHY [CMD...]: records a step that did not run, and what it would have run.
skip_step() {
    local name="$1" why="$2"; shift 2
    STATUS+=("$name: skipped ($why)")
    say ""
    say "=== $name: skipped ($why)${*:+; would run: $*}"
}

# cuda_step NAME LIMIT_S CMD...: run_step on a GPU, skip_step in the dry mode.
cuda_step() {
    local name="$1" limit="$2"; shift 2
    if [[ -n "$DRY" ]]; then skip_step "$name" "dry run: needs CUDA" "$@"; return 0; fi
    run_step "$name" "$limit" "$@"
}

say "semfid gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), mode: ${DRY:+dry run, }${DRY:-GPU}"

# semfid.kernels is kernels/ (a symlink in a checkout, package_dir when installed); a copied working
# tree may lack the link, which is ignored by git.
if [[ ! -e semfid/kernels ]]; then
    ln -s ../kernels semfid/kernels && say "note: created the semfid/kernels -> ../kernels link"
fi

# ---- 1. environment -----------------------------------------------------------------------------
env_report() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_cap --format=csv
    else echo "nvidia-smi: not found"; fi
    if command -v nvcc >/dev/null; then echo "nvcc: $(nvcc --version | tail -n 1)"; else echo "nvcc: not found"; fi
    local cc=""
    for c in "${CC:-}" cc gcc clang; do
        if [[ -n "$c" ]] && command -v "$c" >/dev/null; then cc="$c"; break; fi
    done
    echo "C compiler (Triton's launcher): ${cc:-NOT FOUND (Triton cannot build its launcher)}"
    if command -v compute-sanitizer >/dev/null; then echo "compute-sanitizer: $(command -v compute-sanitizer)"
    else echo "compute-sanitizer: not found"; fi
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown), $(nproc) cores"
    $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())'
    $PY -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not importable"
    $PY -c 'import semfid; print("semfid", semfid.__version__, "from", semfid.__file__, "backends", semfid.available_backends())'
    [[ -n "$cc" ]]
}
export -f env_report
export PY
run_step env 30 bash -c env_report

ARCH=""
[[ -z "$DRY" ]] && ARCH=$($PY -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}")' 2>/dev/null || echo "")
say "detected compute capability: ${ARCH:-none}"

# ---- 2. self-test of the Triton kernels on this GPU ------------------------------------------------
if $PY -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("semfid.selftest") else 1)' 2>/dev/null; then
    mkdir -p "$VERDICTS"
    cuda_step selftest 150 $PY -m semfid.selftest --backend triton --ship "$VERDICTS"  # 90 s was too short on an H200
    cuda_step selftest_sdpa 60 $PY -m semfid.selftest --backend sdpa --quick --ship "$VERDICTS"
else
    STATUS+=("selftest: missing (semfid.selftest is not in this checkout)")
    say ""; say "=== selftest: missing (no semfid.selftest module in this checkout)"
fi

# ---- 3. the GPU tests -----------------------------------------------------------------------------
PYTEST=($PY -m pytest -q -rs -p no:cacheprovider)
# Only the files that hold GPU tests (the others may import diffusers, which the GPU image lacks),
# one process each: a CUDA fault poisons the rest of its process (the 2026-12-04 H200 run lost a
# whole file that way). test_cuda_ext.py runs in step 5, once the extension is built.
for f in $(grep -l "mark\.gpu" tests/test_*.py); do
    [[ "$f" == tests/test_cuda_ext.py ]] && continue
    name=$(basename "$f" .py); cuda_step "pytest_gpu_${name#test_}" 70 "${PYTEST[@]}" -m gpu "$f"
done

# ---- 3a. every key-blocked Triton DiT launch in its own process; the first fault under memcheck --
cuda_step triton_joint_probe 120 $PY benchmarks/triton_joint_probe.py --timeout 40 --only bfloat16-bwd

# ---- 3b. the key-blocked Triton kernels on DiT layers at 1024 px (joint key sets): fwd+bwd timings --
# (their float64 checks ran in step 3: tests/test_triton_joint_gpu.py; the battery of step 2 too)
cuda_step triton_joint 45 $PY benchmarks/triton_joint_timing.py --reps 10

# ---- 4. opcheck + torch.compile (inductor, fullgraph) with transposed views, on CUDA ----------------
cuda_step library_cuda 60 env SEMFID_TEST_DEVICE=cuda "${PYTEST[@]}" tests/test_library.py -k "opcheck or compile"

# ---- 5. the CUDA extension for this arch, and its tests ---------------------------------------------
if cuda_step cuda_build 150 env SEMFID_BUILD_CUDA=1 SEMFID_CUDA_ARCHS="${ARCH:-90}" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY setup.py -q build_ext --inplace; then
    cuda_step selftest_cuda 60 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
        $PY -m semfid.selftest --backend cuda --ship "$VERDICTS"
    # the GPU tests first: on the 2026-12-04 H200 image an error thrown inside the extension (a
    # TORCH_CHECK, test_shared_memory_fits_sm80_at_sd_shapes) crashed the process with SIGSEGV
    cuda_step cuda_tests 90 bash -c "SEMFID_TEST_DEVICE=cuda ${PYTEST[*]} -m gpu tests/test_cuda_ext.py; \
        SEMFID_TEST_DEVICE=cuda SEMFID_TEST_BACKENDS=cuda ${PYTEST[*]} -x tests/test_library.py tests/test_ops_reference.py; \
        ${PYTEST[*]} -m 'not gpu' tests/test_cuda_ext.py"
else
    skip_step cuda_tests "the CUDA build failed"
fi

# ---- 6. compute-sanitizer on one forward + backward per head dim -------------------------------------
CASE=($PY benchmarks/sanitizer_case.py)
if [[ -n "$DRY" ]]; then
    run_step sanitizer_driver 40 "${CASE[@]}" --device cpu --backend torch
    skip_step memcheck "dry run: needs CUDA" compute-sanitizer --tool memcheck "${CASE[@]}"
    skip_step racecheck "dry run: needs CUDA" compute-sanitizer --tool racecheck "${CASE[@]}"
elif command -v compute-sanitizer >/dev/null; then
    run_step memcheck 75 compute-sanitizer --tool memcheck --error-exitcode 1 "${CASE[@]}"
    run_step racecheck 75 compute-sanitizer --tool racecheck --error-exitcode 1 "${CASE[@]}"
else
    skip_step memcheck "compute-sanitizer not found"; skip_step racecheck "compute-sanitizer not found"
fi

# ---- 7. the timing table ------------------------------------------------------------------------------
if [[ -n "$DRY" ]]; then  # the plumbing only: one tiny CPU case, no timing worth reading
    run_step attn_speed 60 $PY benchmarks/attn_speed.py --quick --cases sd15_8 --batch 1 --modes forward \
        --impl eager --budget-s 0 --no-progress --json "$OUT_DIR/attn_speed.json"
else
    run_step attn_speed 150 $PY benchmarks/attn_speed.py --device cuda --dtype float16 \
        --rep-ms 40 --compile-budget-s 30 --no-progress \
        --json "$OUT_DIR/attn_speed.json" --plot "$OUT_DIR/attn_speed.png"
fi

# ---- 8. a whole training step (needs diffusers, absent from the GPU image) ------------------------------
if [[ -n "$DRY" ]]; then
    skip_step train_step "dry run: needs CUDA" $PY benchmarks/train_step.py --device cuda --size full
elif $PY -c 'import diffusers' >/dev/null 2>&1; then
    # GPU_CHECK_COMPILE=1: also the compiled steps (inductor default, reduce-overhead = CUDA graphs;
    # compiling the full-size UNets takes minutes, so the step gets 15 minutes then)
    run_step train_step "$([[ -n "${GPU_CHECK_COMPILE:-}" ]] && echo 900 || echo 120)" $PY benchmarks/train_step.py --device cuda --size full --dtype bfloat16 \
        --batch 2 --steps 4 --warmup 1 --json "$OUT_DIR/train_step.json" \
        ${GPU_CHECK_COMPILE:+--compile-modes eager default reduce-overhead}
else
    skip_step train_step "diffusers is not installed here"
fi

# ---- 9. summary and the verdict file ------------------------------------------------------------------
{
    echo ""
    echo "=== gpu_check summary ($(elapsed)s total, mode: ${DRY:+dry run, }${DRY:-GPU}) ==="
    for s in "${STATUS[@]}"; do echo "  $s"; done
    $PY benchmarks/gpu_check_summary.py "$OUT_DIR"
    if compgen -G "$VERDICTS/*.json" >/dev/null; then
        echo ""
        echo "verdict files to commit into semfid/verdicts/ (the self-tests' --ship output):"
        for f in "$VERDICTS"/*.json; do echo "--- $f"; cat "$f"; echo ""; done
    else
        echo ""
        echo "verdict file: none written (${DRY:+dry run; }the self-test did not run or did not pass)"
    fi
} 2>&1 | tee "$OUT_DIR/summary.txt" | tee -a "$LOG"

[[ -n "$DRY" ]] && echo "dry run: nothing that needs CUDA ran" | tee -a "$LOG"
for s in "${STATUS[@]}"; do [[ "$s" == *FAILED* || "$s" == *"TIMED OUT"* ]] && exit 1; done
exit 0
