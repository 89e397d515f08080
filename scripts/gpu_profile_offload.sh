#!/usr/bin/env bash
# On the GPU machine (carry runs/routing/gpu): cProfile of the offloading benchmark, one policy and batch per file
# ($OUT/prof_<policy>_b<batch>.out; read with python -m pstats).
set -u
cd "$(dirname "$0")/.."
source scripts/gpu_offload_pkg.sh
for p in lookahead lfu+lookahead activation_freq+lookahead; do
  for b in 8 1; do
    n=$(echo $p | tr '+' '_')_b$b
    timeout 100 python3 -m cProfile -o $OUT/prof_$n.out -m tritonmoe.tools.bench_offload --shape qwen3 --traces runs/routing/gpu/qwen3.npz --budgets 25 --batch $b --policies $p --new-tokens 32 --groups-b1 2 --groups-bn 1 --warmup-tokens 4 --out $OUT/r_$n.json 2>&1 | grep -E "TPOT|error|Error" 
  done
done
