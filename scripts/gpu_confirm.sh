#!/usr/bin/env bash
# On the GPU machine (carry runs/routing/gpu): the offloading GPU tests, then the default rules timed at 25% beside
# the lookahead with LRU eviction (SHAPES, BATCH). Results in $OUT.
set -u
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/gpu_offload_pkg.sh
(cd /tmp && timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -x -p no:cacheprovider -m gpu "$repo/tests/test_offload_cuda.py" 2>&1 | tail -4 | tee $OUT/gpu_tests.log)
for shape in ${SHAPES:-qwen3 dsv2lite}; do
  timeout ${BENCH_TIMEOUT:-90} python3 -m tritonmoe.tools.bench_offload --shape $shape --traces runs/routing/gpu/$shape.npz \
    --budgets 25 --batch ${BATCH:-8 1} --policies ${POLICIES:-activation_freq+lookahead lookahead} --new-tokens 32 \
    --groups-b1 2 --groups-bn 1 --warmup-tokens 4 --out $OUT/confirm_$shape.json 2>&1 | grep -E "TPOT|rror"
done
