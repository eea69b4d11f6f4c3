#!/usr/bin/env bash
# On a CUDA machine that already has torch and triton and no network: build dlkern in place, run the full test
# suite with the CUDA tests enabled, run the benchmark, and leave logs, results.csv, plots and targets in OUT_DIR.
#
#   bash bench/gpu_run.sh [OUT_DIR] [--quick] [--no-build] [--no-tests] [more bench/run.py options]
#
# OUT_DIR defaults to bench/results/<UTC date>-<GPU>. --quick is the run meant to finish within 10 minutes on
# an H200 (benchmark alone: a few minutes); the full benchmark takes longer -- split it with --suite, one OUT_DIR
# per part, where a command's time is limited. Without a git checkout set DLKERN_COMMIT so rows say what ran.
set -uo pipefail

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
  python -m pip install --no-build-isolation --no-deps -e . >>"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
fi
python -c "import dlkern, json; print(json.dumps(dlkern.build_info))" | tee -a "$out/build.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
echo "=== build done at $((SECONDS - start)) s"

if [[ $tests == 1 ]]; then
  echo "=== tests"
  python -m pytest -q -rs >"$out/tests.log" 2>&1 || status=1
  tail -25 "$out/tests.log"
  echo "=== tests done at $((SECONDS - start)) s"
fi

echo "=== benchmark: python bench/run.py --device cuda --out $out ${bench_args[*]-}"
python bench/run.py --device cuda --out "$out" ${bench_args[@]+"${bench_args[@]}"} >"$out/bench.log" 2>&1 || status=1
cat "$out/bench.log"
echo "=== done at $((SECONDS - start)) s, status $status"
exit $status
