#!/usr/bin/env bash
# One short GPU call (device `run`, carry .gpu and runs/routing/gpu/qwen3.npz): the offloading GPU tests, the copy
# engine's per-fetch overhead, and the offloader's host time per decode step on the Qwen3 shape. Results in $OUT.
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
(source scripts/gpu_env.sh
 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_offload_cuda.py tests/test_offload_disk.py \
   tests/test_pinned_registry.py tests/test_offload_shm.py 2>&1 | tail -6 | tee "$out/gpu_tests.log"
 for per_call in 1 6; do
   timeout 40 python3 -m tritonmoe.backend.offload.timing --device cuda --expert-mib 17.3 --fetches 400 \
     --per-call $per_call 2>&1 | tail -3 | tee -a "$out/fetch_overhead.log"
 done)
pkg=/tmp/offload-pkg; rm -rf $pkg; mkdir -p $pkg/tritonmoe
cp tritonmoe/__init__.py $pkg/tritonmoe/; cp -r backend $pkg/tritonmoe/backend; cp -r tools $pkg/tritonmoe/tools
PYTHONPATH=$pkg timeout 90 python3 -m tritonmoe.tools.bench_offload --host-time --shape qwen3 \
  --traces runs/routing/gpu/qwen3.npz --device cuda --dtype bfloat16 --batch 1 8 --budgets 25 --new-tokens 32 \
  --warmup-tokens 4 --groups-b1 2 --groups-bn 1 --policies lru lookahead activation_flat+lookahead activation_freq+lookahead lfu+lookahead \
  --out "$out/host_time_qwen3.json" 2>&1 | grep "B=" | tee "$out/host_time.log"
