#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu_payload.sh here; carry .gpu): the GPU test suite, the main job on a
# KIND_GPU instance (experts resident, then offloaded), and the serving benchmark with a larger random MoE.
# Logs and results go to $OUT (or ./gpu-out).
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import numpy, torch, transformers; print('numpy', numpy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
stage "GPU tests"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tee "$out/gpu_tests.log" | tail -15
stage "main job, KIND_GPU"
set -o pipefail
timeout 150 python3 -m tritonmoe.tools.serve --device gpu --max-tokens 48 --log "$out/serve_gpu.server.log" 2>&1 \
  | tee "$out/serve_gpu.log" | grep -v "^$" | tail -6 || { echo "main job failed: stopping here"; exit 1; }
stage "main job, KIND_GPU, experts offloaded (25%)"
timeout 150 python3 -m tritonmoe.tools.serve --device gpu --max-tokens 48 --param expert_cache_budget=25% \
  --log "$out/serve_gpu_offload.server.log" 2>&1 | tee "$out/serve_gpu_offload.log" | grep -v "^$" | tail -4
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
stage "serving benchmark"
timeout ${BENCH_TIMEOUT:-330} python3 -m tritonmoe.tools.bench_serving --device gpu --hidden 2048 --heads 16 --kv-heads 4 \
  --layers 8 --experts 16 --top-k 2 --expert-ffn 1408 --dtype bfloat16 --repeat 2 --interval 2 \
  --plot --plot-path "$out/serving_gpu.png" --out "$out/bench_serving_gpu.json" --workdir /tmp/bench-work 2>&1 \
  | tee "$out/bench_serving_gpu.log" | tail -25
tail -c 20000 /tmp/bench-work/tritonserver.log > "$out/bench_server_tail.log" 2>/dev/null
