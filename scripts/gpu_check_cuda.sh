#!/usr/bin/env bash
# GPU verification of the CUDA backend. Run from anywhere on a machine with a CUDA GPU (sm_80+), nvcc and a
# CUDA build of torch (plus pytest; triton optional):
#
#   scripts/gpu_check_cuda.sh                # build for this GPU, test, sanitize, benchmark
#   SKIP_BENCH=1 scripts/gpu_check_cuda.sh   # without the benchmark
#
# Steps (each one's status is summarised at the end and in $OUT/cuda_check_<gpu>.md):
#   1. build scale_kernels._C in place (SCALE_KERNELS_BUILD_CUDA=1 python setup.py build_ext --inplace) for
#      this GPU's arch (override: SCALE_KERNELS_CUDA_ARCHS="80;90a"; MAX_JOBS sets parallel compiles);
#   2. tests/test_ops_cuda.py (every reference test incl. the realistic 3-backend agreement) and
#      tests/test_csrc_compile.py;
#   3. compute-sanitizer memcheck (torch's caching allocator off, so out-of-bounds accesses inside pooled
#      blocks are caught), racecheck and synccheck on a few small reference tests (bf16 WMMA + fp32 SIMT
#      paths, partial tiles, e_in = 0);
#   4. scripts/bench_cuda.py: cuda vs triton vs cuBLAS timings -> $OUT/cuda_bench_<gpu>.json.
# Outputs go to $OUT (default benchmarks/results). Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$OUT"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check_cuda.sh: no CUDA device visible to torch" >&2
  exit 2
fi
TAG=$($PY -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name(0)).strip('_'))")
DETECTED_ARCH=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(0); print(f'{M}{m}' + ('a' if (M, m) == (9, 0) else ''))")
export SCALE_KERNELS_CUDA_ARCHS=${SCALE_KERNELS_CUDA_ARCHS:-$DETECTED_ARCH}
export MAX_JOBS=${MAX_JOBS:-8}
LOG="$OUT/cuda_check_$TAG.log"
SUMMARY="$OUT/cuda_check_$TAG.md"
: >"$LOG"
declare -a STATUS=()
overall=0

record() {  # record <step name> <exit code>
  local s="PASS"
  if [ "$2" -ne 0 ]; then s="FAIL (exit $2)"; overall=1; fi
  STATUS+=("| $1 | $s |")
  echo "== $1: $s" | tee -a "$LOG"
}

{
  echo "== $(date -u +%FT%TZ) $TAG arch=$SCALE_KERNELS_CUDA_ARCHS"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  command -v nvcc >/dev/null && nvcc --version | tail -2
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

# 1. build ---------------------------------------------------------------------------------------------
echo "== build" | tee -a "$LOG"
start=$(date +%s)
SCALE_KERNELS_BUILD_CUDA=1 $PY setup.py build_ext --inplace >>"$LOG" 2>&1
rc=$?
echo "build took $(( $(date +%s) - start )) s" | tee -a "$LOG"
record "build ($SCALE_KERNELS_CUDA_ARCHS)" $rc
if [ $rc -ne 0 ]; then tail -40 "$LOG"; exit 1; fi
$PY -c "import scale_kernels as sk; r = sk.available_backends('cuda'); print(r); assert r['cuda'] is None, r['cuda']" 2>&1 | tee -a "$LOG"
record "extension loads, dispatcher reports cuda usable" "${PIPESTATUS[0]}"

# 2. tests ---------------------------------------------------------------------------------------------
$PY -m pytest tests/test_ops_cuda.py tests/test_csrc_compile.py -q -rs --junitxml="$OUT/cuda_tests_$TAG.xml" 2>&1 | tee -a "$LOG"
record "pytest tests/test_ops_cuda.py tests/test_csrc_compile.py" "${PIPESTATUS[0]}"

# 3. compute-sanitizer -----------------------------------------------------------------------------------
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
SMALL="test_matches_reference and trainable and soft and (bf16 or fp32) and (odd_3d or tiny or e_in0)"
for tool in memcheck racecheck synccheck; do
  sel="$SMALL"
  [ "$tool" != memcheck ] && sel="test_matches_reference and trainable and soft and (bf16 or fp32) and odd_3d"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 9 --target-processes all \
    $PY -m pytest tests/test_ops_cuda.py -q -x -p no:cacheprovider -k "$sel" >"$OUT/cuda_sanitizer_${tool}_$TAG.log" 2>&1
  rc=$?
  tail -5 "$OUT/cuda_sanitizer_${tool}_$TAG.log" | tee -a "$LOG"
  record "compute-sanitizer $tool" $rc
done

# 4. benchmark -------------------------------------------------------------------------------------------
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  $PY scripts/bench_cuda.py --out "$OUT/cuda_bench_$TAG.json" 2>&1 | tee -a "$LOG"
  record "benchmark (bf16) -> $OUT/cuda_bench_$TAG.json" "${PIPESTATUS[0]}"
fi

{
  echo "# CUDA backend check on $TAG ($(date -u +%F))"
  echo
  echo "| step | result |"
  echo "| --- | --- |"
  printf '%s\n' "${STATUS[@]}"
  echo
  echo "Full log: \`$LOG\`; sanitizer logs: \`$OUT/cuda_sanitizer_*_$TAG.log\`."
} >"$SUMMARY"
cat "$SUMMARY"
exit $overall
