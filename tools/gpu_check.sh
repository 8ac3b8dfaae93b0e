#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU, build recallprune for that GPU, run the
# CUDA tests, run every kernel path again under compute-sanitizer (memcheck, racecheck) at
# small sizes, run both benchmarks on CUDA (JSON under benchmarks/results/), and end with a
# pass/fail summary. Exits 0 only when no stage failed.
#
# The tests and the two sanitizer runs only check results, so they run side by side; the
# benchmarks run afterwards, alone on the GPU.
#
# Environment:
#   PYTHON                 the Python that holds a CUDA build of torch (default: python3)
#   MAX_JOBS               parallel compile jobs (default: the CPUs, at most 16)
#   TORCH_CUDA_ARCH_LIST   default: the compute capability of the visible GPU
#   GPU_CHECK_SKIP         stages to skip, space-separated: build tests memcheck racecheck
#                          memcheck-large bench-optimizer bench-confusion
#   GPU_CHECK_LOGS         folder for the logs (default: build/gpu-check)
#   GPU_CHECK_TIMEOUT      seconds each stage may take (default 1200); per stage:
#                          GPU_CHECK_TIMEOUT_BUILD, _TESTS, _MEMCHECK, _RACECHECK,
#                          _MEMCHECK_LARGE, _BENCH
#   GPU_CHECK_BENCH_ARGS   extra arguments for both benchmarks (e.g. --quick)
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOGS=${GPU_CHECK_LOGS:-build/gpu-check}
SKIP=" ${GPU_CHECK_SKIP:-} "
mkdir -p "$LOGS"
rm -f "$LOGS"/*.rc "$LOGS"/*.seconds
# This checkout's package first, whatever else is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

STAGES=()

limit_for() {  # limit_for KEY: the stage's time limit in seconds
  local var="GPU_CHECK_TIMEOUT_$1"
  echo "${!var:-${GPU_CHECK_TIMEOUT:-1200}}"
}

# run_stage NAME LIMIT COMMAND...: the command's output goes to $LOGS/NAME.log, its exit
# status to $LOGS/NAME.rc (124: it ran out of time), its duration to $LOGS/NAME.seconds.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  echo $? >"$LOGS/$name.rc"
  echo $((SECONDS - start)) >"$LOGS/$name.seconds"
}

# skip NAME REASON: record a stage that did not run.
skip() {
  echo "$2" >"$LOGS/$1.skipped"
  STAGES+=("$1")
}

wants() {  # wants NAME: whether GPU_CHECK_SKIP leaves the stage in
  [[ "$SKIP" != *" $1 "* ]]
}

# -- the GPU ---------------------------------------------------------------------------------
if ! "$PYTHON" - <<'EOF'; then
import sys
import torch
if not torch.cuda.is_available() or torch.version.cuda is None:
    print(f"gpu-check: torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
    sys.exit(1)
props = torch.cuda.get_device_properties(0)
print(f"gpu-check: {props.name}, compute capability {props.major}.{props.minor}, "
      f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}; {sys.executable}")
EOF
  echo "gpu-check: FAIL (no CUDA GPU; this target needs a machine with one)"
  exit 1
fi
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  export TORCH_CUDA_ARCH_LIST
fi
if [[ -z "${MAX_JOBS:-}" ]]; then
  MAX_JOBS=$(nproc 2>/dev/null || echo 4)
  ((MAX_JOBS > 16)) && MAX_JOBS=16
  export MAX_JOBS
fi
echo "gpu-check: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS logs in $LOGS/"

# -- build -------------------------------------------------------------------------------------
build() {
  local check="
import sys, recallprune
print('recallprune kernels for CUDA:', recallprune.has_ops('cuda'), recallprune.load_error() or '')
sys.exit(0 if recallprune.has_ops('cuda') else 1)"
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || return
    "$PYTHON" -c "$check" && return
    echo "the editable install left no loadable extension here: building in place"
  fi
  "$PYTHON" setup.py build_ext --inplace || return
  "$PYTHON" -c "$check"
}
export -f build
export PYTHON

built=1
if wants build; then
  echo "== build"
  run_stage build "$(limit_for BUILD)" bash -c build
  STAGES+=(build)
  [[ $(cat "$LOGS/build.rc") == 0 ]] || built=0
fi

# -- tests and sanitizers, side by side ------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z "$SANITIZER" && -x "$candidate" ]] && SANITIZER=$candidate
done

pids=()
if ! wants tests; then
  skip tests "GPU_CHECK_SKIP"
elif ((!built)); then
  skip tests "the build failed"
else
  echo "== tests (pytest -k cuda)"
  run_stage tests "$(limit_for TESTS)" "$PYTHON" -m pytest -q -k cuda -p no:cacheprovider tests &
  pids+=($!)
  STAGES+=(tests)
fi
# memcheck-large: the large cases (more than 2**31 logits, a tensor of more than 320 chunks)
# on their own, so that their time limit cannot hide the small cases' result.
for stage in memcheck racecheck memcheck-large; do
  tool=${stage%-large}
  key=${stage^^}
  key=${key//-/_}
  if ! wants "$stage"; then
    skip "$stage" "GPU_CHECK_SKIP"
  elif ((!built)); then
    skip "$stage" "the build failed"
  elif [[ -z "$SANITIZER" ]]; then
    skip "$stage" "compute-sanitizer not found"
  else
    # racecheck looks at shared memory, which only the confusion kernels use.
    only=()
    [[ $tool == racecheck ]] && only=(--only confusion)
    [[ $stage == memcheck-large ]] && only=(--large)
    echo "== $stage (compute-sanitizer --tool $tool on tools/cuda_kernel_cases.py ${only[*]})"
    # Without torch's caching allocator every tensor is its own allocation, so memcheck
    # sees an access past a tensor's end.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      run_stage "$stage" "$(limit_for "$key")" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
        --print-limit 20 "$PYTHON" tools/cuda_kernel_cases.py "${only[@]}" &
    pids+=($!)
    STAGES+=("$stage")
  fi
done
((${#pids[@]})) && wait "${pids[@]}"

# -- benchmarks, alone on the GPU ------------------------------------------------------------------
read -r -a bench_args <<<"${GPU_CHECK_BENCH_ARGS:-}"
for bench in optimizer confusion; do
  name=bench-$bench
  if ! wants "$name"; then
    skip "$name" "GPU_CHECK_SKIP"
  elif ((!built)); then
    skip "$name" "the build failed"
  else
    echo "== $name"
    run_stage "$name" "$(limit_for BENCH)" "$PYTHON" "benchmarks/bench_$bench.py" \
      --device cuda "${bench_args[@]}"
    STAGES+=("$name")
  fi
done

# -- summary ---------------------------------------------------------------------------------------
detail() {  # detail NAME: one line of what the stage's log says
  local log="$LOGS/$1.log"
  case $1 in
    build) grep -a "recallprune kernels for CUDA" "$log" | tail -n 1 ;;
    tests) grep -aE "[0-9]+ (passed|failed|error)" "$log" | tail -n 1 ;;
    memcheck*) grep -aE "ERROR SUMMARY|agree with the reference" "$log" | tr '\n' ' ' ;;
    racecheck) grep -aE "RACECHECK SUMMARY|agree with the reference" "$log" | tr '\n' ' ' ;;
    bench-*) grep -a "wrote" "$log" | tail -n 1 | sed 's/.*wrote /wrote /' ;;
  esac
}

failed=0
skipped=0
for name in "${STAGES[@]}"; do
  if [[ -f "$LOGS/$name.skipped" ]]; then
    echo "--- $name: skipped ($(cat "$LOGS/$name.skipped"))"
    continue
  fi
  rc=$(cat "$LOGS/$name.rc")
  if [[ $rc != 0 ]]; then
    echo "--- $name failed (exit $rc$([[ $rc == 124 ]] && echo ', out of time')); end of $LOGS/$name.log:"
    tail -n 40 "$LOGS/$name.log"
  fi
done
echo
echo "== gpu-check summary"
for name in "${STAGES[@]}"; do
  if [[ -f "$LOGS/$name.skipped" ]]; then
    printf '%-16s SKIP   %5s   %s\n' "$name" "" "$(cat "$LOGS/$name.skipped")"
    skipped=$((skipped + 1))
    continue
  fi
  rc=$(cat "$LOGS/$name.rc")
  status=PASS
  [[ $rc == 0 ]] || { status=FAIL; failed=$((failed + 1)); }
  [[ $rc == 124 ]] && status=TIMEOUT
  printf '%-16s %-7s %4ss   %s\n' "$name" "$status" "$(cat "$LOGS/$name.seconds")" \
    "$(detail "$name" | cut -c1-120)"
done
if ((failed)); then
  echo "gpu-check: FAIL ($failed stage(s) failed, $skipped skipped; logs in $LOGS/)"
  exit 1
fi
echo "gpu-check: PASS$( ((skipped)) && echo " ($skipped stage(s) skipped)")"
