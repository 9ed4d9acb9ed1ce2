#!/usr/bin/env bash
# GPU verification of the CUDA backend, in a fixed time budget. Needs a CUDA GPU (sm_80+), nvcc, a CUDA build
# of torch and pytest (triton optional: the benchmark compares against it when present).
#
#   scripts/gpu_check_cuda.sh OUTDIR            # build, test, sanitize, benchmark; everything lands in OUTDIR
#   CUDA_CHECK_BUDGET_S=140 (default)           # the whole script stays within this many seconds
#   SCALE_KERNELS_CUDA_ARCHS=90a MAX_JOBS=16     # defaults: this GPU's arch ("a" on sm_90), 16 compile jobs
#
# Steps, each under `timeout` with what is left of the budget (capped per step), skipped when too little is
# left; a step that fails or times out never stops the later ones:
#   1. build scale_kernels._C in place (SCALE_KERNELS_BUILD_CUDA=1 python setup.py build_ext --inplace) ~20 s
#   2. pytest tests/test_ops_cuda_extension.py -m "not slow"                                          ~30 s
#   3. compute-sanitizer memcheck on tests/test_ops_cuda_extension.py::test_sanitizer_cases (both scopes, torch's
#      caching allocator off so that every tensor is its own allocation)                              ~20 s
#   4. compute-sanitizer racecheck on the decode-kernel scope of the same test                        ~15 s
#   5. python -m scripts.bench_cuda -> OUTDIR/cuda_bench.json (decode T = 1, 4, 16, 64; T = 4096, 16384) the rest
# OUTDIR/cuda_check.md is the summary (rewritten after every step, so it exists even if the caller kills this
# script); each step's output is in OUTDIR/cuda_<step>.log. Exit status: 0 when every step passed.
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${CUDA_CHECK_BUDGET_S:-140}
START=$(date +%s)
SUMMARY="$OUT/cuda_check.md"
declare -a ROWS=()
overall=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

write_summary() {
  {
    echo "# CUDA backend check ($(date -u +%FT%TZ))"
    echo
    cat "$OUT/cuda_env.txt" 2>/dev/null | sed 's/^/    /'
    echo
    echo "| step | result | seconds | log |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
  } >"$SUMMARY"
}

# step <name> <cap seconds> <log name> <command...>: runs the command under timeout min(cap, remaining - 2)
step() {
  local name=$1 cap=$2 log="$OUT/cuda_$3.log"
  shift 3
  local left=$(($(remaining) - 2)) limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    ROWS+=("| $name | SKIPPED (time budget spent) | 0 | |")
    overall=1
    write_summary
    return
  fi
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
  local rc=$? result="PASS"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    result="TIMEOUT after ${limit} s"
    overall=1
  elif [ $rc -ne 0 ]; then
    result="FAIL (exit $rc)"
    overall=1
  fi
  ROWS+=("| $name | $result | $(($(date +%s) - t0)) | \`$(basename "$log")\` |")
  echo "== $name: $result ($(($(date +%s) - t0)) s)"
  tail -3 "$log"
  write_summary
}

if ! timeout 60 $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check_cuda.sh: no CUDA device visible to torch" | tee "$SUMMARY" >&2
  exit 2
fi
DETECTED_ARCH=$(timeout 60 $PY -c "import torch; M, m = torch.cuda.get_device_capability(0); print(f'{M}{m}' + ('a' if (M, m) == (9, 0) else ''))")
export SCALE_KERNELS_CUDA_ARCHS=${SCALE_KERNELS_CUDA_ARCHS:-$DETECTED_ARCH}
export MAX_JOBS=${MAX_JOBS:-16}
{
  timeout 60 $PY -c "import torch, platform; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| python', platform.python_version())"
  timeout 20 nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>&1 | head -1
  command -v nvcc >/dev/null && timeout 20 nvcc --version | tail -1
  echo "arch $SCALE_KERNELS_CUDA_ARCHS, MAX_JOBS $MAX_JOBS, budget $BUDGET s"
} >"$OUT/cuda_env.txt" 2>&1
cat "$OUT/cuda_env.txt"

step "build ($SCALE_KERNELS_CUDA_ARCHS)" 90 build \
  env SCALE_KERNELS_BUILD_CUDA=1 $PY setup.py build_ext --inplace
step "extension loads, cuda backend usable" 30 load \
  $PY -c "import scale_kernels as sk, torch; r = sk.available_backends('cuda', torch.bfloat16); print(r); assert r['cuda'] is None, r['cuda']"
step "pytest tests/test_ops_cuda_extension.py (not slow)" 75 tests \
  $PY -m pytest tests/test_ops_cuda_extension.py -q -rs -m "not slow" -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"

SAN=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$candidate" ] && SAN=$candidate
done
if [ -z "$SAN" ]; then
  ROWS+=("| compute-sanitizer memcheck / racecheck | NOT RUN (compute-sanitizer not found) | 0 | |")
  overall=1
  write_summary
else
  step "compute-sanitizer memcheck (test_sanitizer_cases, no caching allocator)" 60 memcheck \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 \
    $PY -m pytest tests/test_ops_cuda_extension.py -q -x -p no:cacheprovider -k test_sanitizer_cases
  step "compute-sanitizer racecheck (decode kernel)" 45 racecheck \
    "$SAN" --tool racecheck --error-exitcode 9 \
    $PY -m pytest tests/test_ops_cuda_extension.py -q -x -p no:cacheprovider -k "test_sanitizer_cases and decode_forward"
fi

step "benchmark (bf16) -> cuda_bench.json" 600 bench \
  $PY -m scripts.bench_cuda --out "$OUT/cuda_bench.json"
[ -f "$OUT/cuda_bench.md" ] && { echo; cat "$OUT/cuda_bench.md"; } >>"$SUMMARY"
cat "$SUMMARY"
exit $overall
