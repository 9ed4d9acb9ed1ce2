#!/usr/bin/env bash
# The prepared GPU check of the benchmarks: one command, at most ~8 minutes on a fresh H100, every step under its
# own timeout and all of them under one overall deadline, every output in one folder.
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine (run from anywhere; it cd's to the repo root)
#   bash benchmarks/gpu_check.sh --smoke    # CPU plumbing check: every step on tiny shapes (CI-safe, ~1 min)
#
# Steps (in this order; a failed or timed-out step is recorded and the next one still runs):
#   tests     python -m pytest -m gpu                      (Triton GPU tests, tests/test_ops_triton_gpu.py & co.)
#   cuda      scripts/gpu_check_cuda.sh <dir>/cuda          (build with MAX_JOBS=16, tests, sanitizer, benchmark)
#   tune      python -m scale_kernels.tune                  (dispatch table for this GPU -> <dir>/dispatch_table.json;
#                                                            the later steps' `auto` reads it)
#   layer     python -m benchmarks.bench_layer              (T in 16384 4096 16 1, d=4096 e=1024, every mode and pass:
#                                                            auto + every backend + hand-written + dense + GEMM)
#   compiled  the same, torch.compile of the hand-written module at T=16384 and 16 (compilation is the slow part)
#   model     python -m benchmarks.bench_model $MODEL_BENCH_ARGS
#   host      python -m benchmarks.bench_host              (CPU host overhead, on this machine's idle CPU)
#   report    plots, results.md and every target as met / not met / not evaluated
#
# Outputs: RESULTS_DIR (default benchmarks/results/<gpu-slug>/; --smoke: a fresh temp folder): layer.json,
# model.json, host.json, dispatch_table.json, results.md, PNGs, cuda/, logs/<step>.log, gpu_check.log and
# gpu_check_summary.md. When OUT is set (the device tool's output folder) everything is also packed into
# $OUT/gpu_check.tar.gz, with $OUT/gpu_check.log next to it. Exit status 0 when every step that ran passed.
#
# GPU_CHECK_STEPS (default: all) lists the steps to run, e.g. "tune layer"; the others are reported as skipped.
# Time: GPU_CHECK_BUDGET_S (default 470 s) is the overall deadline; each step gets min(its T_<STEP> timeout,
# what is left minus RESERVE_S for the report), and a step with under 10 s left is skipped. Override any
# T_TESTS T_CUDA T_TUNE T_LAYER T_COMPILED T_MODEL T_HOST in the environment.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1

# model benchmark (benchmarks/bench_model.py --help): both shapes, what users get (auto), few timed steps so the
# step fits its timeout; --liger needs liger-kernel (absent on the GPU image: carry the wheel, see docs/benchmarks.md),
# without it those records say "skipped"
MODEL_BENCH_ARGS=${MODEL_BENCH_ARGS-"--backends auto --warmup 1 --iters 3 --no-do-bench --liger swiglu rope"}

STEPS=" ${GPU_CHECK_STEPS:-tests cuda tune layer compiled model host} "
BUDGET=${GPU_CHECK_BUDGET_S:-470}
RESERVE=${RESERVE_S:-20}
T_TESTS=${T_TESTS:-120}
T_CUDA=${T_CUDA:-70}
T_TUNE=${T_TUNE:-40}
T_LAYER=${T_LAYER:-90}
T_COMPILED=${T_COMPILED:-35}
T_MODEL=${T_MODEL:-75}
T_HOST=${T_HOST:-15}

if [ "$SMOKE" = 1 ]; then
  DIR=${RESULTS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_smoke.XXXXXX")}
else
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch (use --smoke for the CPU plumbing check)" >&2
    exit 2
  fi
  SLUG=$($PY -c "import torch; from benchmarks.results import device_name, device_slug; print(device_slug(device_name(torch.device('cuda'))))")
  DIR=${RESULTS_DIR:-benchmarks/results/$SLUG}
fi
mkdir -p "$DIR/logs"
DIR=$(cd "$DIR" && pwd)
LOG="$DIR/gpu_check.log"
SUMMARY="$DIR/gpu_check_summary.md"
: >"$LOG"
START=$(date +%s)
declare -a ROWS=()
overall=0

log() { echo "$*" | tee -a "$LOG"; }

# step <name> <timeout s> <command...>: run under timeout within the overall deadline, log, record the status
step() {
  local name=$1 limit=$2; shift 2
  if [[ "$STEPS" != *" $name "* ]]; then skip "$name" "not in GPU_CHECK_STEPS"; return 0; fi
  local left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    ROWS+=("| $name | SKIPPED (overall time budget spent) | 0 s |"); log "== $name: SKIPPED (time budget)"
    return 0
  fi
  log "== $name (timeout ${limit} s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$DIR/logs/$name.log" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} took=$(( $(date +%s) - t0 )) status="PASS"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT after ${limit} s"; overall=1
  elif (( rc != 0 )); then status="FAIL (exit $rc)"; overall=1; fi
  ROWS+=("| $name | $status | ${took} s |")
  log "== $name: $status (${took} s)"
}

skip() {  # skip <name> <reason>
  ROWS+=("| $1 | SKIPPED ($2) | 0 s |"); log "== $1: SKIPPED ($2)"
}

{
  echo "== gpu_check $(date -u +%FT%TZ) smoke=$SMOKE dir=$DIR commit=$(git rev-parse --short HEAD 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import importlib.metadata as m
for d in ('triton', 'transformers', 'peft', 'pytest', 'hypothesis', 'matplotlib'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'MISSING')"
} 2>&1 | tee -a "$LOG"

if [ "$SMOKE" = 1 ]; then
  step tests "$T_TESTS" $PY -m pytest tests/test_ops_triton_gpu.py -q -p no:cacheprovider  # skips without CUDA
  skip cuda "smoke: needs a GPU and nvcc"
  step tune "$T_TUNE" $PY -m scale_kernels.tune --device cpu --shape 32,8,32,8 --tokens 4 --modes route \
    --backends torch --out "$DIR/dispatch_table.json"
  step layer "$T_LAYER" $PY -m benchmarks.bench_layer --smoke --tokens 4 --modes route --backends auto torch \
    --baselines handwritten equal_flop_gemm --out "$DIR/layer.json"
  step compiled "$T_COMPILED" $PY -m benchmarks.bench_layer --smoke --tokens 4 --modes route --backends auto \
    --passes forward --baselines handwritten_compiled --append --out "$DIR/layer.json"
  step model "$T_MODEL" $PY -m benchmarks.bench_model --smoke --variants full_ft upscaled --backends torch \
    --checkpointing off --out "$DIR/model.json"
  step host "$T_HOST" $PY -m benchmarks.bench_host --smoke --modes route --out "$DIR/host.json"
else
  step tests "$T_TESTS" $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$DIR/logs/gpu_tests.xml"
  step cuda "$T_CUDA" env MAX_JOBS=16 CUDA_CHECK_BUDGET_S=$(( T_CUDA - 5 )) bash scripts/gpu_check_cuda.sh "$DIR/cuda"
  step tune "$T_TUNE" $PY -m scale_kernels.tune --shape 4096,1024,4096,1024 --tokens 16384 4096 16 1 \
    --time-budget $(( T_TUNE - 15 )) --out "$DIR/dispatch_table.json"
  step layer "$T_LAYER" $PY -m benchmarks.bench_layer --tokens 16384 4096 16 1 --hidden 4096 \
    --baselines handwritten dense_linear equal_flop_gemm --out "$DIR/layer.json"
  step compiled "$T_COMPILED" $PY -m benchmarks.bench_layer --tokens 16384 16 --hidden 4096 --backends auto \
    --baselines handwritten_compiled --append --out "$DIR/layer.json"
  # shellcheck disable=SC2086  # MODEL_BENCH_ARGS is a list of options
  step model "$T_MODEL" $PY -m benchmarks.bench_model --out "$DIR/model.json" $MODEL_BENCH_ARGS
  step host "$T_HOST" $PY -m benchmarks.bench_host --out "$DIR/host.json"
fi
[ -f "$DIR/dispatch_table.json" ] && log "== dispatch table used by auto in layer/model: $DIR/dispatch_table.json"

# report: plots (matplotlib optional), results.md and every target; always runs (RESERVE_S is kept for it)
jsons=()
for f in layer model; do [ -f "$DIR/$f.json" ] && jsons+=("$DIR/$f.json"); done
if (( ${#jsons[@]} )); then
  timeout -k 5 30 $PY -m benchmarks.plot "${jsons[@]}" >>"$LOG" 2>&1 || log "== plots: not drawn (see log)"
fi
TARGETS=$(timeout -k 5 30 $PY -m benchmarks.report "$DIR" 2>>"$LOG") || TARGETS="report failed: see $LOG"
{
  echo "# GPU check ($(date -u +%F), $( [ "$SMOKE" = 1 ] && echo 'CPU SMOKE RUN: not measurements' || echo "$DIR"))"
  echo
  echo "| step | result | time |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Total $(( $(date +%s) - START )) s. Targets (scale_kernels[auto]):"
  echo
  echo '```'
  echo "$TARGETS"
  echo '```'
} >"$SUMMARY"
cat "$SUMMARY" | tee -a "$LOG"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$DIR")" "$(basename "$DIR")"
  cp "$LOG" "$OUT/gpu_check.log"
  echo "== packed $DIR into $OUT/gpu_check.tar.gz"
fi
exit $overall
