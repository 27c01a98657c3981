#!/usr/bin/env bash
# Follow-up of gpu_check.sh's first GPU run (2026-12-04 14:32): the fixes and the open faults only.
# < 300 s on an H200. Log: $OUT/followup.log.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTD="${OUT:-/tmp/followup_out}"; mkdir -p "$OUTD"
LOG="$OUTD/followup.log"; : >"$LOG"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
[[ -e semfid/kernels ]] || ln -s ../kernels semfid/kernels
T0=$(date +%s)
say() { echo "=== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
step() { local lim=$1; shift; say "$*"; timeout -k 5 "$lim" "$@" 2>&1 | grep -v "UserWarning: semfid is imported\|^  import semfid\|warnings.warn" | tee -a "$LOG"; echo "rc=${PIPESTATUS[0]}" | tee -a "$LOG"; }

# The CUDA extension builds on a copy, on the CPUs, while the GPU steps run.
rm -rf /tmp/cu && mkdir -p /tmp/cu && cp -r csrc semfid kernels tests benchmarks setup.py pyproject.toml README.md LICENSE MANIFEST.in /tmp/cu/
rm -f /tmp/cu/semfid/kernels && ln -s ../kernels /tmp/cu/semfid/kernels
( cd /tmp/cu && SEMFID_BUILD_CUDA=1 SEMFID_CUDA_ARCHS=90 MAX_JOBS=12 timeout 200 python3 setup.py -q build_ext --inplace \
    >/tmp/cu/build.log 2>&1; echo "cuda build rc=$?" >>/tmp/cu/build.log ) &
BUILD=$!

step 150 python3 benchmarks/triton_joint_probe.py --timeout 40 --only sd3-subject-float16-fwd flux-maps-bfloat16 pixart-maps-float16-fwd sd3-maps-float16-fwd flux-subject-bfloat16-fwd
step 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sdpa.py
step 60 python3 benchmarks/triton_joint_probe.py --no-sanitizer --timeout 30 --tiles 64,64,8 --only sd3-subject-float16 flux-maps-bfloat16 pixart-maps-float16-bwd
step 30 python3 benchmarks/triton_joint_probe.py --no-sanitizer --timeout 30 --tiles 32,64,4 --only sd3-subject-float16-fwd flux-maps-bfloat16-fwd

say "waiting for the CUDA build"; wait $BUILD; tail -n 3 /tmp/cu/build.log | tee -a "$LOG"
cd /tmp/cu
export PYTHONPATH=/tmp/cu
step 20 python3 -X faulthandler -c "import torch, semfid._C; print('smem_bytes', torch.ops.semfid_C.smem_bytes('xattn_fwd', 40, 77, 77))"
step 50 python3 -m semfid.selftest --backend cuda --ship "$OUTD"
step 40 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda_ext.py -k "not shared_memory"
say "done"
