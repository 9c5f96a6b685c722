#!/usr/bin/env bash
# The GPU check of fastnas, in one command: build from source with the CUDA kernels, run the test
# suite on CUDA (every backend against the reference), run the mixed-sum benchmarks and print the
# table (time, GB/s, fraction of copy bandwidth, speed-ups per backend, shape and dtype).
#
#   bash benchmarks/gpu_check.sh          # from the repository root of a GPU machine
#
# Needs a CUDA GPU, torch with CUDA, Triton, nvcc (found through CUDA_HOME or /usr/local/cuda*),
# pytest and pytest-benchmark; no network. Everything ends within GPU_CHECK_BUDGET_S seconds (default
# 350, under 6 minutes): the kernel bandwidth on large tensors (bench_large_tensors.py) and the
# targets of bench_mixed_sum.py ([64,16,32,32] and the largest shape, K=8) run first, its other
# shapes with what time is left. Copy what it prints into benchmarks/RESULTS.md.
#
# Environment:
#   PYTHON                 interpreter with torch (default python3)
#   TORCH_CUDA_ARCH_LIST   architectures to build (default: the visible GPU's, e.g. 9.0)
#   MAX_JOBS               parallel compiles (default: CPU count)
#   GPU_CHECK_BUDGET_S     wall-clock budget of the whole check, build included (default 350)
#   GPU_CHECK_OUT          where logs, benchmark JSON, report.md and bandwidth.png go
#                          (default .benchmarks/gpu_check, ignored by git)
# Exit status: 0 when the build and the tests passed (benchmarks cut short by the budget do not fail it).
set -uo pipefail

cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-350}
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-.benchmarks/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
stage() { echo; echo "=== [$(elapsed)s] $*"; }

stage "machine"
if ! GPU=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"); then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 2
fi
"$PY" - <<'EOF'
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"triton {triton_version}")
EOF
ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
JOBS=${MAX_JOBS:-$(nproc)}

stage "build: FASTNAS_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$JOBS pip install --no-build-isolation -e ."
BUILD_START=$(date +%s)
if ! FASTNAS_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$JOBS \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "gpu_check: the build failed (full log: $OUT/build.log)" >&2
  exit 1
fi
BUILD_S=$(($(date +%s) - BUILD_START))
echo "built in ${BUILD_S}s"
if ! "$PY" -c "
import fastnas
from fastnas import backend
assert backend.extension_has_cuda(), 'fastnas._C has no CUDA kernels'
print('backends on cuda:', fastnas.available_backends('cuda'), '-> auto picks', fastnas.get_backend('cuda'))
"; then
  echo "gpu_check: the installed fastnas has no CUDA kernels" >&2
  exit 1
fi

# the tests get what the budget leaves after ~170 s kept for the benchmarks and the report
stage "tests: pytest tests -q -x"
TEST_LIMIT=$(($(left) - 170))
[ "$TEST_LIMIT" -lt 60 ] && TEST_LIMIT=60
timeout -s INT -k 10 "$TEST_LIMIT" "$PY" -m pytest tests -q -x -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests.log" | tail -25
TEST_RC=${PIPESTATUS[0]}
[ "$TEST_RC" -eq 124 ] && echo "gpu_check: the tests ran past ${TEST_LIMIT}s and were stopped"

TARGETS="64x16x32x32-K8 or 256x64x32x32-K8"
BENCH=(--benchmark-only -q -p no:cacheprovider --benchmark-columns=median,min,rounds)
rm -f "$OUT"/bench_*.json
stage "benchmarks: kernel bandwidth on large tensors (bench_large_tensors.py, CUDA events)"
LIMIT=$(($(left) - 120))
if [ "$LIMIT" -gt 20 ]; then
  timeout -s INT -k 10 "$LIMIT" "$PY" -m pytest benchmarks/bench_large_tensors.py "${BENCH[@]}" \
    --benchmark-json="$OUT/bench_large.json" >"$OUT/bench_large.log" 2>&1
  echo "exit status $? (log: $OUT/bench_large.log)"
fi
stage "benchmarks: the targets of bench_mixed_sum.py ($TARGETS)"
LIMIT=$(($(left) - 20))
if [ "$LIMIT" -gt 20 ]; then
  timeout -s INT -k 10 "$LIMIT" "$PY" -m pytest benchmarks/bench_mixed_sum.py "${BENCH[@]}" -k "$TARGETS" \
    --benchmark-json="$OUT/bench_targets.json" >"$OUT/bench_targets.log" 2>&1
  echo "exit status $? (log: $OUT/bench_targets.log)"
fi
stage "benchmarks: the other shapes, with the time left"
LIMIT=$(($(left) - 20))
if [ "$LIMIT" -gt 20 ]; then
  timeout -s INT -k 10 "$LIMIT" "$PY" -m pytest benchmarks/bench_mixed_sum.py "${BENCH[@]}" -k "not ($TARGETS)" \
    --benchmark-json="$OUT/bench_others.json" >"$OUT/bench_others.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "stopped by the budget: the table holds what finished"
  echo "exit status $rc (log: $OUT/bench_others.log)"
else
  echo "skipped: no time left in the ${BUDGET}s budget"
fi

stage "report"
"$PY" benchmarks/report.py "$OUT"/bench_*.json --machine "$GPU" --markdown "$OUT/report.md" --plot "$OUT/bandwidth.png"

stage "summary"
echo "GPU: $GPU; build ${BUILD_S}s (TORCH_CUDA_ARCH_LIST=$ARCH); tests exit status $TEST_RC; total $(elapsed)s"
echo "files: $OUT/{build,tests,bench_large,bench_targets,bench_others}.log, bench_*.json, report.md, bandwidth.png"
[ "$TEST_RC" -eq 0 ]
