#!/usr/bin/env bash
# On the GPU machine (carry runs/routing/gpu): A/B runs of the offloader's knobs at 25%: the compact-bank limit
# (GATHER_MIB, GATHER_MAX_BYTES) and the prefetch window (WINDOW_MIB, PREFETCH_WINDOW_BYTES), per SHAPES and BATCH.
# Results in $OUT/ab_<shape>_g<MiB>_w<MiB>.json.
set -u
cd "$(dirname "$0")/.."
source scripts/gpu_offload_pkg.sh
for shape in ${SHAPES:-qwen3}; do
  for g in ${GATHER_MIB:-2048}; do
    for w in ${WINDOW_MIB:-64}; do
      echo "=== $shape gather $g MiB, window $w MiB"
      timeout ${AB_TIMEOUT:-200} python3 -m tritonmoe.tools.bench_offload --shape $shape \
        --traces runs/routing/gpu/$shape.npz --budgets 25 --batch ${BATCH:-8 1} --gather-max-mib $g \
        --prefetch-window-mib $w --policies ${POLICIES:-lookahead lfu+lookahead activation_freq+lookahead} \
        --new-tokens 32 --groups-b1 2 --groups-bn 1 --warmup-tokens 4 --rounds ${ROUNDS:-1} --out $OUT/ab_${shape}_g${g}_w${w}.json 2>&1 \
        | grep -E "TPOT|rror"
    done
  done
done
