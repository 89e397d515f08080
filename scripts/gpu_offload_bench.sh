#!/usr/bin/env bash
# On the GPU machine, from the repository root (device `run`, carry: runs/routing runs/wheels): the offloading
# GPU tests, routing-trace training on the GPU, and the offloading benchmark. Everything lands in $OUT.
#   STAGES="tests train bench" SHAPES="dsv2lite qwen3" bash scripts/gpu_offload_bench.sh
# The package is laid out under /tmp (the checkout's tritonmoe/ folder would shadow it), and pytest runs from
# outside the checkout for the same reason.
set -u
cd "$(dirname "$0")/.."
repo=$PWD
out=${OUT:-$repo/gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
source scripts/gpu_offload_pkg.sh
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, numpy, cuda.bindings; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'cuda-bindings', cuda.bindings.__version__)"
STAGES=${STAGES:-tests train bench}
# trace files <shape>.npz when this run does not train: the GPU-trained ones when carried, else the CPU-trained ones
TRACES_DIR=${TRACES_DIR:-$( [ -d runs/routing/gpu ] && echo runs/routing/gpu || echo runs/routing )}
SHAPES=${SHAPES:-dsv2lite qwen3}
case " $STAGES " in *" tests "*)
  stage "GPU offload tests"
  (cd /tmp && timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests/test_offload_cuda.py" 2>&1 | tail -15 | tee "$out/gpu_tests.log")
;; esac
case " $STAGES " in *" train "*)
  for shape in $SHAPES; do
    stage "train routing: $shape"
    req=96; [ "$shape" = qwen3 ] && req=80  # a trace file must stay under 16 MB to come back
    timeout ${TRAIN_TIMEOUT:-240} python3 -m tritonmoe.tools.train_routing --shape "$shape" --device cuda \
      --corpus runs/routing/corpus.npz --minutes ${TRAIN_MIN:-2} --hidden 128 --expert-ffn 64 --batch 32 \
      --requests $req --out "$out/$shape.npz" 2>&1 | tee -a "$out/train.log" | grep -v "^step"
  done
;; esac
case " $STAGES " in *" bench "*)
  # 1. the offloader's host time per decode step (real layer x expert x top-k counts, tiny widths, the CUDA copy
  #    engine and kernels): seconds per shape; 2. the full-size benchmark at 25% (BENCH_ARGS replaces the default).
  for shape in $SHAPES; do
    [ "${SKIP_HOST_TIME:-0}" = 1 ] && break
    traces=$out/$shape.npz; [ -f "$traces" ] || traces=$TRACES_DIR/$shape.npz
    tr_arg=; [ -f "$traces" ] && tr_arg="--traces $traces"
    stage "host time: $shape (${tr_arg:-synthetic routing})"
    timeout ${HOST_TIMEOUT:-90} python3 -m tritonmoe.tools.bench_offload --host-time --shape "$shape" $tr_arg \
      --device cuda --dtype bfloat16 --batch 1 8 --budgets 25 --new-tokens 32 --warmup-tokens 4 --groups-b1 1 \
      --groups-bn 1 --out "$out/host_time_$shape.json" 2>&1 | tee -a "$out/host_time.log"
  done
  for shape in $SHAPES; do
    traces=$out/$shape.npz; [ -f "$traces" ] || traces=$TRACES_DIR/$shape.npz
    if [ ! -f "$traces" ]; then echo "bench: $shape skipped: no $traces (carry $TRACES_DIR, or STAGES=train first)"; continue; fi
    stage "bench: $shape ($traces)"
    timeout ${BENCH_TIMEOUT:-270} python3 -m tritonmoe.tools.bench_offload --shape "$shape" --traces "$traces" \
      --out "$out/bench_offload_$shape.json" ${BENCH_ARGS:---budgets 25 --batch 1 8 --policies resident activation lru lfu lookahead lfu+lookahead activation_flat+lookahead activation_freq+lookahead auto+lookahead accelerate --new-tokens 32 --groups-b1 2 --groups-bn 1 --warmup-tokens 4} \
      2>&1 | tee -a "$out/bench.log" | grep -v "^|"
  done
;; esac
stage done
