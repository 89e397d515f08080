#!/usr/bin/env bash
# The router's headline benchmark: locality vs random vs round-robin placement over one tritonserver per GPU,
# with several multi-GB random-weight MoE checkpoints converted and served through one loader service for the
# machine (tools/bench_router.py --device gpu --loader). Writes JSON, a plot and the log to $OUT (or ./gpu-out).
#
# On the lent GPU machine (kind nvidia-h200-x2), after scripts/gpu_payload.sh built .gpu/ here (carry [".gpu"]):
#   bash scripts/gpu_router_bench.sh                     # about 7 minutes, checkpoint creation included
# Knobs (environment): MODELS (6), MODEL_GB (2.5), REQUESTS (60: a 76 s trace), MEAN_GAP (1.0 s), CV (2),
# KEEP_ALIVE (20 s), MAX_MODELS (3 per server), MAX_TOKENS (64), POLICIES (locality,random,round_robin; locality+migration is
# locality with placement-driven migration), BENCH_TIMEOUT (480 s; results are written after every policy),
# POOL (unset; 1: add --pool, one warm engine pool for the machine named as every host's engine_pool, so cold starts
# claim pre-started engine workers; PER_DEVICE warm workers per device, default 2; outputs get the suffix _pool).
# SERVERS (one per GPU; more share the GPUs round-robin); PLAIN=1: no loader and no pool, every cold start a plain
# from_pretrained in a fresh stub (the issue's "round-robin with plain Triton loading" baseline; outputs _plain).
# On a machine without a GPU (the CPU check: tiny models, same path): DEVICE=cpu bash scripts/gpu_router_bench.sh
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-gpu}
out=${OUT:-$PWD/gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = gpu ]; then
  source scripts/gpu_env.sh
  PY=python3
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  defaults=(6 2.5 60 1.0 20 3 64 2)
else
  # the CPU check: this checkout's .venv (or the python on PATH), tiny models, two CPU servers
  PY=${PYTHON:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
  defaults=(3 0 8 1.5 6 1 8 4)
fi
MODELS=${MODELS:-${defaults[0]}}; MODEL_GB=${MODEL_GB:-${defaults[1]}}; REQUESTS=${REQUESTS:-${defaults[2]}}
MEAN_GAP=${MEAN_GAP:-${defaults[3]}}; KEEP_ALIVE=${KEEP_ALIVE:-${defaults[4]}}; MAX_MODELS=${MAX_MODELS:-${defaults[5]}}
MAX_TOKENS=${MAX_TOKENS:-${defaults[6]}}
servers=(); [ "$DEVICE" = cpu ] && servers=(--servers 2)
[ -n "${SERVERS:-}" ] && servers=(--servers "$SERVERS")
loader=(--loader); [ "${PLAIN:-0}" = 1 ] && loader=()
pool=(); tag=$DEVICE
if [ "${POOL:-0}" = 1 ]; then pool=(--pool --per-device "${PER_DEVICE:-2}"); tag=${DEVICE}_pool; fi
[ "${PLAIN:-0}" = 1 ] && tag=${DEVICE}_plain
work=$(mktemp -d /tmp/router-bench-XXXX)
cmd=("$PY" -m tritonmoe.tools.bench_router --device "$DEVICE" "${servers[@]}" "${loader[@]}" --models "$MODELS"
     --model-gb "$MODEL_GB" --requests "$REQUESTS" --mean-gap "$MEAN_GAP" --cv "${CV:-${defaults[7]}}" --keep-alive "$KEEP_ALIVE"
     --max-models "$MAX_MODELS" --max-tokens "$MAX_TOKENS" --policies "${POLICIES:-locality,random,round_robin}"
     "${pool[@]}" --workdir "$work" --out "$out/router_bench_$tag.json" --plot "$out/router_bench_$tag.png")
echo "command: ${cmd[*]}"
echo "machine: $(uname -n), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
echo "date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
timeout "${BENCH_TIMEOUT:-480}" "${cmd[@]}" 2>&1 | tee "$out/router_bench_$tag.log"
rc=${PIPESTATUS[0]}
for f in "$work"/server*.log "$work"/loader/service.log "$work"/pool.log "$work"/router.log; do  # the ends of the logs
  [ -f "$f" ] && tail -c 20000 "$f" > "$out/$(basename "$(dirname "$f")")_$(basename "$f")"
done
rm -rf "$work"
echo "exit $rc; done $(date -u '+%H:%M:%S UTC')"
exit "$rc"
