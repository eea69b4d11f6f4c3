#!/usr/bin/env bash
# On a CUDA machine that already has torch and triton and no network: build dlkern in place, run the full test
# suite with the CUDA tests enabled, run the benchmark, and leave logs and results in OUT_DIR.
#
#   bash bench/gpu_run.sh OUT_DIR [--quick]
set -uo pipefail
out=${1:?usage: bench/gpu_run.sh OUT_DIR [--quick]}
quick=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

echo "=== build" | tee "$out/build.log"
python -m pip install --no-build-isolation --no-deps -e . >>"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python -c "import dlkern, json; print(json.dumps(dlkern.build_info))" | tee -a "$out/build.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1

echo "=== tests"
python -m pytest -q -rs >"$out/tests.log" 2>&1 || status=1
tail -25 "$out/tests.log"

echo "=== benchmark"
python bench/run.py $quick --out "$out" >"$out/bench.log" 2>&1 || status=1
cat "$out/bench.log"
exit $status
