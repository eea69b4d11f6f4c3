#!/usr/bin/env bash
# dlkern on a CUDA machine that already has torch and triton and no network (a lent GPU: README, "On a lent GPU").
#
# The run in steps, each fitting one device command (at most 8 minutes; bench/gpu_plan.py holds the plan):
#
#   bash bench/gpu_run.sh --step 1 OUT_DIR [--pack]     # build + CUDA smoke test of every op family + launch plans
#   bash bench/gpu_run.sh --step 2 OUT_DIR [--pack]     # the benchmark's most informative rows, first-step time, ResNet-18
#   bash bench/gpu_run.sh --step 3 OUT_DIR [--pack]     # the whole test suite, in parallel
#   bash bench/gpu_run.sh --step 1,2 OUT_DIR [--pack]   # several steps in one command, sharing --budget (540 s)
#   bash bench/gpu_run.sh --dry-run                     # every step's commands, estimates and files; runs nothing
#   bash bench/gpu_run.sh --collect FILES_DIR [DEST]    # here: returned files -> bench/results/<date>-<gpu>
#
# --pack puts the details into OUT_DIR/details.tar.gz (a lent GPU returns at most 8 files); --only PART,... runs
# only the named parts (see --dry-run). Python is $PYTHON, else python3.
#
# The all-in-one run of before (no --step): build, the whole test suite, then the benchmark, into OUT_DIR:
#
#   bash bench/gpu_run.sh [OUT_DIR] [--quick] [--no-build] [--no-tests] [more bench/run.py options]
#
# OUT_DIR defaults to bench/results/<UTC date>-<GPU>. It takes longer than one 10-minute device command: on a lent
# GPU use the steps. Without a git checkout set DLKERN_COMMIT so rows say what ran.
set -uo pipefail

PY=${PYTHON:-python3}
for arg in "$@"; do
  case $arg in
    --step|--step=*|--dry-run|--collect|--collect=*|--merge|--env|--env=*|-h|--help)
      exec "$PY" "$(dirname "$0")/gpu_plan.py" "$@" ;;  # paths stay relative to where it was called from
  esac
done

out=""
if [[ $# -gt 0 && $1 != --* ]]; then
  mkdir -p "$1" && out=$(cd "$1" && pwd)  # absolute: relative to where the script was called from
  shift
fi
cd "$(dirname "$0")/.."
build=1 tests=1 bench_args=()
for arg in "$@"; do
  case $arg in
    --no-build) build=0 ;;
    --no-tests) tests=0 ;;
    *) bench_args+=("$arg") ;;
  esac
done
if [[ -z $out ]]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
  out=bench/results/$(date -u +%Y%m%d-%H%M)-${gpu:-gpu}
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
start=$SECONDS

if [[ $build == 1 ]]; then
  echo "=== build" | tee "$out/build.log"
  "$PY" -m pip install --no-build-isolation --no-deps -e . >>"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
fi
"$PY" -c "import dlkern, json; print(json.dumps(dlkern.build_info))" | tee -a "$out/build.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
echo "=== build done at $((SECONDS - start)) s"

if [[ $tests == 1 ]]; then
  echo "=== tests"
  "$PY" -m pytest -q -rs >"$out/tests.log" 2>&1 || status=1
  tail -25 "$out/tests.log"
  echo "=== tests done at $((SECONDS - start)) s"
fi

echo "=== benchmark: $PY bench/run.py --device cuda --out $out ${bench_args[*]-}"
"$PY" bench/run.py --device cuda --out "$out" ${bench_args[@]+"${bench_args[@]}"} >"$out/bench.log" 2>&1 || status=1
cat "$out/bench.log"
echo "=== done at $((SECONDS - start)) s, status $status"
exit $status
