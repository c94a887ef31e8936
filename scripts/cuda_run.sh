#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (no network there; its python3 has torch, transformers,
# pytest, hypothesis, pytest-xdist): fused_flash against float64, the sparse 32k prefill / 128k
# decode tables, the kernels and decode suites, then the test suite on the GPU. Every stage has
# its own time limit; what each wrote lands in $OUT (at most 7 files: the device tool returns 8).
#   OUT=/tmp/o bash scripts/cuda_run.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cuda-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/run.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/run.txt"
stage() { local name=$1 limit=$2; shift 2; local t0=$SECONDS; timeout "$limit" "$@"; echo "== $name: rc $? in $((SECONDS - t0)) s" | tee -a "$OUT/run.txt"; }
stage fused_check 60 python3 scripts/cuda_fused_check.py > "$OUT/fused_check.log" 2>&1
tail -3 "$OUT/fused_check.log"
stage sparse_speed ${SPARSE_S:-150} python3 scripts/cuda_sparse_speed.py "$OUT/sparse_speed.json" > "$OUT/sparse_speed.log" 2>&1
tail -25 "$OUT/sparse_speed.log"
stage bench_kernels ${KERNELS_S:-100} python3 -m longattn.cli bench --suite kernels --device cuda --lengths ${KERNELS_LENGTHS:-4096,16384,32768} \
  --dtypes ${KERNELS_DTYPES:-float32,bfloat16} --methods ${KERNELS_METHODS:-dense,window,streaming,pattern:document,pattern:block_map} --allow-partial --out /tmp/bk > "$OUT/bench_kernels.log" 2>&1
cp /tmp/bk/results.json "$OUT/bench_kernels.json" 2>/dev/null
tail -5 "$OUT/bench_kernels.log"
stage tests ${TESTS_S:-240} env LONGATTN_TEST_DEVICE=cuda python3 -m pytest -p no:cacheprovider -o addopts="" -v -n 16 --timeout 120 --maxfail 100 \
  --deselect tests/test_wheel.py --deselect tests/test_report_html.py --deselect tests/test_packaging.py \
  -rfE tests > "$OUT/tests.log" 2>&1
grep -E "(FAILED|ERROR) tests" "$OUT/tests.log" | sed 's/.*\(FAILED\|ERROR\) /\1 /' | cut -c1-200 | sort | uniq | head -60
echo "passed: $(grep -c ' PASSED' "$OUT/tests.log"), failed: $(grep -c ' FAILED' "$OUT/tests.log"), skipped: $(grep -c ' SKIPPED' "$OUT/tests.log")"
tail -2 "$OUT/tests.log"
grep "^== " "$OUT/run.txt"
