#!/usr/bin/env bash
# The GPU check of fastnas in one command of at most about 6 minutes, from the repository root of a
# machine with a CUDA GPU (no network needed):
#
#   bash benchmarks/gpu_check.sh
#
# Stages, in priority order, each under its own time budget (enforced with `timeout`; a stage cut
# short says so and the next one still runs):
#   facts      the card, clocks as read, driver, versions (benchmarks/gpu_facts.py; nvidia-smi is
#              only queried)
#   build      pip install -e . with the CUDA kernels for the visible GPU's architecture
#              (FASTNAS_CUDA=1, --no-build-isolation --no-deps --no-index, MAX_JOBS = cores, ptxas -v)
#   tests      the op tests on CUDA, cuda and triton backends against the reference (test files
#              named *mixed_sum*, *cuda*, *triton*, *kernel*; not the CLI or distributed ones), then
#              the autocast tests of every file (fp16, bf16; none yet is fine)
#   sanitizer  compute-sanitizer memcheck and racecheck on benchmarks/gpu_sanitize.py
#   kernels    kernel-only times with CUDA events against a device copy (benchmarks/gpu_kernels.py)
#   host       host microseconds per forward+backward per backend (benchmarks/gpu_kernels.py host)
#   supernet   one training step of NAS-Bench-201 and DARTS, fastnas against the eager supernets,
#              eager and as one CUDA graph (benchmarks/gpu_supernet.py)
# then summary.md (benchmarks/gpu_summary.py), printed last.
#
# Files (at most 8, flat) in GPU_CHECK_OUT: summary.md (ready to paste into benchmarks/RESULTS.md),
# check.log (everything printed), build.log, tests.log, sanitizer.log, kernels.json, host.json,
# supernet.json.
#
# Exit status: 0 build, tests and sanitizer passed; 1 the build failed; 2 no CUDA GPU (or no torch);
# 3 the tests failed, were cut short or none passed; 4 the sanitizer found errors. The timing
# stages never change it.
#
# Environment:
#   PYTHON               interpreter with torch (default python3)
#   GPU_CHECK_OUT        output folder (default .benchmarks/gpu_check, ignored by git)
#   GPU_CHECK_BUDGET_S   the whole check's budget in seconds (default 335; the summary, at most 15 s, after)
#   GPU_CHECK_BUDGET_<STAGE>  one stage's cap in seconds (FACTS, BUILD, TESTS, SANITIZER, KERNELS,
#                        HOST, SUPERNET; see CAP below); a stage also stops early enough to leave
#                        every later stage its reserve (KEEP below)
#   GPU_CHECK_DRY=1      dry run on the CPU: every stage runs a quick stand-in (no build, tests
#                        collected not run, the sanitizer's driver without the sanitizer, timings of
#                        the CPU backends at tiny sizes), all labelled as not GPU numbers
#   GPU_CHECK_BUILD=0    use the fastnas already installed (still checked for CUDA kernels)
#   GPU_CHECK_TESTS      test files to run instead of the selection above
#   GPU_CHECK_COMPILE_STEP=1  also torch.compile(mode="reduce-overhead") the supernet step (slow)
#   GPU_CHECK_COMMIT     the commit to name in the summary (default: git's, where there is a .git)
#   TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME  as for any build (defaults: the GPU's, the cores, found)
set -uo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FILES=(summary.md check.log build.log tests.log sanitizer.log kernels.json host.json supernet.json)

if [ -z "${_GPU_CHECK_INNER:-}" ]; then
  # resolve the output folder (relative to where we were called from), then run again with all
  # output also written to check.log
  OUT_DIR=${GPU_CHECK_OUT:-$ROOT/.benchmarks/gpu_check}
  mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }
  OUT_DIR="$(cd "$OUT_DIR" && pwd)"
  for f in "${FILES[@]}"; do rm -f "$OUT_DIR/$f"; done
  _GPU_CHECK_INNER=1 GPU_CHECK_OUT="$OUT_DIR" bash "$SELF" "$@" 2>&1 | tee "$OUT_DIR/check.log"
  exit "${PIPESTATUS[0]}"
fi

cd "$ROOT" || exit 2
OUT=$GPU_CHECK_OUT
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
TOTAL=${GPU_CHECK_BUDGET_S:-335}
START=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1
DRY_ARG=()
if [ "$DRY" = 1 ]; then
  DRY_ARG=(--dry)
  export OMP_NUM_THREADS=1  # the stand-ins are tiny; threads only contend on a shared CI machine
fi
if [ -z "${GPU_CHECK_COMMIT:-}" ]; then
  GPU_CHECK_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  [ "$GPU_CHECK_COMMIT" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] \
    && GPU_CHECK_COMMIT="$GPU_CHECK_COMMIT (with uncommitted changes)"
fi
export GPU_CHECK_COMMIT GPU_CHECK_DRY=$DRY

STAGES=(facts build tests sanitizer kernels host supernet)
# CAP: the most a stage may take; KEEP: the time held back for a stage while the stages before it run
declare -A CAP=([facts]=20 [build]=200 [tests]=150 [sanitizer]=60 [kernels]=150 [host]=20 [supernet]=60)
declare -A KEEP=([facts]=5 [build]=60 [tests]=30 [sanitizer]=20 [kernels]=40 [host]=10 [supernet]=30)
SUMMARY_S=15
for s in "${STAGES[@]}"; do
  var="GPU_CHECK_BUDGET_${s^^}"
  if [ -n "${!var:-}" ]; then
    CAP[$s]=${!var}
    [ "${KEEP[$s]}" -gt "${!var}" ] && KEEP[$s]=${!var}
  fi
done

elapsed() { echo $(($(date +%s) - START)); }

# the seconds a stage may run: its cap, or less so that every later stage keeps its share
stage_limit() {
  local name=$1 later=$SUMMARY_S after=0 s
  for s in "${STAGES[@]}"; do
    [ "$after" = 1 ] && later=$((later + KEEP[$s]))
    [ "$s" = "$name" ] && after=1
  done
  local left=$((TOTAL - $(elapsed) - later))
  if [ "$left" -lt "${CAP[$name]}" ]; then echo "$left"; else echo "${CAP[$name]}"; fi
}

# record NAME STATUS SECONDS LIMIT NOTE: one row of the stage table (status: ok, failed, cut, skipped)
declare -A STATUS=()
record() {
  STATUS[$1]=$2
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$SCRATCH/stages.tsv"
  echo "--- [$(elapsed)s] $1: $2 (${3}s, budget ${4}s)${5:+: $5}"
}

# begin NAME LIMIT: prints the stage's header; false (and records it skipped) when no time is left
begin() {
  if [ "$2" -lt 1 ]; then
    record "$1" skipped 0 0 "no time left in the ${TOTAL}s budget"
    return 1
  fi
  echo
  echo "=== [$(elapsed)s] $1 (budget ${2}s)"
}

# limited LIMIT LOG CMD...: CMD under timeout (SIGNAL, default TERM; KILL 5 s later), its output
# appended to LOG ("-": printed); sets RC (124 when the budget stopped it) and SECS
limited() {
  local limit=$1 log=$2 t0
  shift 2
  [ "$limit" -lt 1 ] && limit=1  # (timeout 0 would mean no limit at all)
  t0=$(date +%s)
  if [ "$log" = - ]; then
    timeout -s "${SIGNAL:-TERM}" -k 5 "$limit" "$@"
  else
    timeout -s "${SIGNAL:-TERM}" -k 5 "$limit" "$@" >>"$log" 2>&1
  fi
  RC=$?
  [ "$RC" -eq 137 ] && RC=124  # killed after ignoring the first signal
  SECS=$(($(date +%s) - t0))
}

# outcome RC: the status of a stage that ran one command (3: a Python stage stopped by its own budget)
outcome() {
  case "$1" in
    0) echo ok ;;
    124 | 3) echo cut ;;
    *) echo failed ;;
  esac
}

have_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# --------------------------------------------------------------------------- stages

stage_facts() {
  local limit
  limit=$(stage_limit facts)
  begin facts "$limit" || return
  if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    NO_GPU=1
    record facts failed 0 "$limit" "no CUDA GPU visible to $PY (torch.cuda.is_available() is False, or no torch)"
    return
  fi
  limited "$limit" - "$PY" benchmarks/gpu_facts.py --json "$SCRATCH/facts.json" --arch-file "$SCRATCH/arch" \
    "${DRY_ARG[@]}"
  record facts "$(outcome $RC)" "$SECS" "$limit" ""
}

find_cuda_home() {
  [ -n "${CUDA_HOME:-}" ] && return
  local root nvcc
  for root in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$root/bin/nvcc" ] && [ -e "$root/lib64/libcudart.so" ]; then
      export CUDA_HOME=$root
      return
    fi
  done
  if nvcc=$(command -v nvcc); then
    export CUDA_HOME
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  fi
}

CHECK_CUDA_BUILD='
import sys, fastnas
from fastnas import backend
print("backends on cuda:", fastnas.available_backends("cuda"), "- auto picks", fastnas.get_backend("cuda"))
sys.exit(0 if backend.extension_has_cuda() else 1)'

stage_build() {
  local limit note arch jobs t0
  limit=$(stage_limit build)
  begin build "$limit" || return
  if [ "$DRY" = 1 ]; then
    echo "dry run: no build; the installed fastnas is imported instead" >>"$OUT/build.log"
    limited "$limit" "$OUT/build.log" "$PY" -c 'import fastnas; print("backends on cpu:", fastnas.available_backends("cpu"))'
    record build "$(outcome $RC)" "$SECS" "$limit" "dry run: no build, fastnas imported ($(tail -1 "$OUT/build.log"))"
    return
  fi
  arch=${TORCH_CUDA_ARCH_LIST:-$(cat "$SCRATCH/arch" 2>/dev/null)}
  [ -z "$arch" ] || [ "$arch" = none ] && arch="8.0;9.0"
  jobs=${MAX_JOBS:-$(nproc)}
  find_cuda_home
  note="TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs CUDA_HOME=${CUDA_HOME:-none}"
  echo "$note"
  t0=$(date +%s)
  if [ "${GPU_CHECK_BUILD:-1}" = 0 ]; then
    note="$note; not rebuilt (GPU_CHECK_BUILD=0)"
    RC=0
  else
    echo "FASTNAS_CUDA=1 $note pip install -v --no-build-isolation --no-deps --no-index -e ." >>"$OUT/build.log"
    limited "$limit" "$OUT/build.log" env FASTNAS_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" \
      NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas -v" \
      "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
  fi
  if [ "$RC" -eq 0 ] && timeout 60 "$PY" -c "$CHECK_CUDA_BUILD" >>"$OUT/build.log" 2>&1; then
    record build ok $(($(date +%s) - t0)) "$limit" "$note; $(tail -1 "$OUT/build.log")"
    return
  fi
  local why="the build failed"
  [ "$RC" -eq 124 ] && why="the build ran past its ${limit}s budget"
  [ "$RC" -eq 0 ] && why="fastnas has no CUDA kernels after the build"
  echo "gpu_check: $why; the end of $OUT/build.log:"
  tail -30 "$OUT/build.log"
  # the triton backend needs no compiled CUDA: a CPU-only build keeps the later stages useful
  local left
  left=$(stage_limit build)
  if [ "${GPU_CHECK_BUILD:-1}" != 0 ] && [ "$RC" -ne 0 ] && [ "$left" -gt 90 ]; then
    echo "=== CPU-only fallback build (FASTNAS_CUDA=0), for the triton backend" | tee -a "$OUT/build.log"
    limited "$left" "$OUT/build.log" env FASTNAS_CUDA=0 MAX_JOBS="$jobs" \
      "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
    [ "$RC" -eq 0 ] && why="$why; a CPU-only build was installed instead (triton still runs)"
  fi
  record build failed $(($(date +%s) - t0)) "$limit" "$note; $why"
}

test_files() {
  if [ -n "${GPU_CHECK_TESTS:-}" ]; then
    echo "$GPU_CHECK_TESTS"
    return
  fi
  # the op tests that run kernels: not the CLI, search or distributed ones, and not the
  # compiled-code tests (they compile for absent GPUs on the CPU, which CI already does)
  ls tests/test_*.py | grep -E "$1" | grep -vE 'cli|distributed|search|gpu_check|benchmark_report|_compiled' | tr '\n' ' '
}

stage_tests() {
  local limit files all main_limit args t0 status note count
  limit=$(stage_limit tests)
  begin tests "$limit" || return
  if [ "${STATUS[build]:-}" != ok ] && ! "$PY" -c "import fastnas" >/dev/null 2>&1; then
    record tests skipped 0 "$limit" "fastnas is not importable (the build failed)"
    return
  fi
  files=$(test_files 'mixed_sum|cuda|triton|kernel')
  all=$(test_files '.')
  args=(-q -p no:cacheprovider -rfE)
  t0=$(date +%s)
  if [ "$DRY" = 1 ]; then
    echo "dry run: the selection is collected, not run" >>"$OUT/tests.log"
    # shellcheck disable=SC2086
    limited "$limit" "$OUT/tests.log" "$PY" -m pytest $files "${args[@]}" --collect-only -k "not cpu and not autocast"
    status=$(outcome $RC)
    count=$(grep -Eo '[0-9]+(/[0-9]+)? tests? (collected|selected)' "$OUT/tests.log" | tail -1)
    if [ "$status" = ok ]; then
      # shellcheck disable=SC2086
      limited $((limit - SECS)) "$OUT/tests.log" "$PY" -m pytest $all "${args[@]}" --collect-only -k "autocast and not cpu"
      [ "$RC" -eq 5 ] && RC=0  # no autocast test yet
      status=$(outcome $RC)
    fi
    record tests "$status" $(($(date +%s) - t0)) "$limit" "dry run: ${count:-nothing} (collected, not run) from $files"
    return
  fi
  have_module pytest_timeout && args+=(--timeout=120)
  local parallel=()  # the many op tests in parallel (Triton compiles most of their time); not the few autocast ones
  have_module xdist && parallel=(-n "$(($(nproc) / 2 < 8 ? $(nproc) / 2 : 8))")
  main_limit=$((limit > 60 ? limit - 20 : limit * 2 / 3))
  echo "pytest $files -k 'not cpu and not autocast' ${args[*]} ${parallel[*]}" | tee -a "$OUT/tests.log"
  # shellcheck disable=SC2086
  SIGNAL=INT limited "$main_limit" "$OUT/tests.log" "$PY" -m pytest $files "${args[@]}" "${parallel[@]}" \
    --durations=10 -k "not cpu and not autocast" --junitxml="$SCRATCH/tests.xml"
  status=$(outcome $RC)
  # junit: the counts, and false unless some test passed and none failed
  if ! note=$("$PY" benchmarks/gpu_summary.py junit "$SCRATCH/tests.xml"); then
    [ "$status" = ok ] && status=failed
  fi
  local rest=$((limit - ($(date +%s) - t0)))
  if [ "$rest" -ge 5 ]; then
    echo "pytest (all test files) -k 'autocast and not cpu'" | tee -a "$OUT/tests.log"
    # shellcheck disable=SC2086
    SIGNAL=INT limited "$rest" "$OUT/tests.log" "$PY" -m pytest $all "${args[@]}" -k "autocast and not cpu" \
      --junitxml="$SCRATCH/autocast.xml"
    if [ "$RC" -eq 5 ]; then
      note="$note; autocast: none yet"
    else
      [ "$status" = ok ] && status=$(outcome $RC)
      local autocast
      if ! autocast=$("$PY" benchmarks/gpu_summary.py junit "$SCRATCH/autocast.xml"); then
        [ "$status" = ok ] && status=failed
      fi
      note="$note; autocast: $autocast"
    fi
  else
    note="$note; autocast: no time left"
  fi
  tail -15 "$OUT/tests.log"
  record tests "$status" $(($(date +%s) - t0)) "$limit" "$note"
}

stage_sanitizer() {
  local limit san tool t0 status=ok notes="" share
  limit=$(stage_limit sanitizer)
  begin sanitizer "$limit" || return
  t0=$(date +%s)
  if [ "$DRY" = 1 ]; then
    echo "=== compute-sanitizer --tool none (dry run: the driver alone, on the CPU backends)" >>"$OUT/sanitizer.log"
    limited "$limit" "$OUT/sanitizer.log" "$PY" benchmarks/gpu_sanitize.py --dry
    record sanitizer "$(outcome $RC)" "$SECS" "$limit" "dry run: driver on CPU, no compute-sanitizer ($(tail -1 "$OUT/sanitizer.log"))"
    return
  fi
  find_cuda_home
  san=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
  if [ -z "$san" ]; then
    record sanitizer skipped 0 "$limit" "compute-sanitizer not found"
    return
  fi
  for tool in memcheck racecheck; do
    share=$((limit - ($(date +%s) - t0)))
    [ "$tool" = memcheck ] && share=$((share / 2))
    if [ "$share" -lt 5 ]; then
      notes="$notes $tool: no time left;"
      status=cut
      continue
    fi
    echo "=== compute-sanitizer --tool $tool (budget ${share}s)" | tee -a "$OUT/sanitizer.log"
    limited "$share" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$san" --tool "$tool" --report-api-errors no --error-exitcode 99 "$PY" benchmarks/gpu_sanitize.py \
      $([ "$tool" = racecheck ] && echo --quick)
    case "$RC" in
      0) notes="$notes $tool: clean;" ;;
      124) notes="$notes $tool: cut short after ${SECS}s;"; [ "$status" = ok ] && status=cut ;;
      99) notes="$notes $tool: ERRORS found;"; status=failed ;;
      *) notes="$notes $tool: exit status $RC;"; status=failed ;;
    esac
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_sanitize:" "$OUT/sanitizer.log" | tail -2
  done
  record sanitizer "$status" $(($(date +%s) - t0)) "$limit" "${notes# }"
}

# timing_stage NAME JSON CMD...: a Python timing stage that stops itself a little before its budget
timing_stage() {
  local name=$1 json=$2 limit budget
  shift 2
  limit=$(stage_limit "$name")
  begin "$name" "$limit" || return
  budget=$((limit - (limit / 10 > 5 ? limit / 10 : 5)))
  [ "$budget" -lt 1 ] && budget=1
  limited "$limit" - "$@" --json "$OUT/$json" --budget-s "$budget" "${DRY_ARG[@]}"
  rm -f "$OUT/$json.tmp"  # left by a stage killed while writing: no ninth file
  local note="results in $json"
  [ "$RC" -eq 3 ] && note="stopped by its budget; $note"
  [ "$RC" -eq 124 ] && note="stopped by timeout; $note"
  record "$name" "$(outcome $RC)" "$SECS" "$limit" "$note"
}

# --------------------------------------------------------------------------- main

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${TOTAL}s, output in $OUT$([ "$DRY" = 1 ] && echo ', DRY RUN on the CPU')"
NO_GPU=0
stage_facts
if [ "$NO_GPU" = 1 ]; then
  EXIT=2
else
  stage_build
  stage_tests
  stage_sanitizer
  COMPILE_ARG=()
  [ "${GPU_CHECK_COMPILE_STEP:-0}" = 1 ] && COMPILE_ARG=(--compile)
  timing_stage kernels kernels.json "$PY" benchmarks/gpu_kernels.py kernels
  timing_stage host host.json "$PY" benchmarks/gpu_kernels.py host
  timing_stage supernet supernet.json "$PY" benchmarks/gpu_supernet.py "${COMPILE_ARG[@]}"
  if [ "${STATUS[build]:-}" != ok ]; then
    EXIT=1
  elif [ "${STATUS[tests]:-}" != ok ]; then
    EXIT=3
  elif [ "${STATUS[sanitizer]:-}" = failed ]; then
    EXIT=4
  else
    EXIT=0
  fi
fi

echo
echo "=== [$(elapsed)s] summary"
if ! timeout -k 5 "$SUMMARY_S" "$PY" benchmarks/gpu_summary.py write --out "$OUT" --scratch "$SCRATCH" \
  --exit-status "$EXIT"; then
  echo "gpu_check: the summary could not be written; the stage table:"
  cat "$SCRATCH/stages.tsv"
fi
count=$(find "$OUT" -maxdepth 1 -type f | wc -l)
[ "$count" -gt 8 ] && echo "gpu_check: $OUT holds $count files; a lent machine returns only 8"
echo "gpu_check: exit status $EXIT after $(elapsed)s"
exit "$EXIT"
