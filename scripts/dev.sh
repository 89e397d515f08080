#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing into ./.venv, then runs a job.
#   scripts/dev.sh serve [tritonmoe-serve flags]   the main job: serve the tiny MoE through tritonserver, stream a reply
#   scripts/dev.sh test  [pytest flags]            the whole test suite (what CI runs)
#   scripts/dev.sh install                         install only
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRITONMOE_VENV:-.venv}
PY=${PYTHON:-python3}

install() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  # torch first and pinned: left to the resolver, "torch>=2.4" pulls a multi-GB CUDA build.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "${pip[@]}" install torch
    else
      "${pip[@]}" install "torch==2.13.0"  # the CPU build
    fi
  fi
  local stamp="$VENV/.tritonmoe-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "${pip[@]}" install -e ".[test]"
    touch "$stamp"
  fi
  # genai-perf in a folder of its own: it pins packages (pandas, optuna, plotly ...) serving does not need.
  # tools/genai_perf.py runs it from there.
  if [ ! -d "$VENV/genai-perf/genai_perf" ]; then
    "${pip[@]}" install --target "$VENV/genai-perf" "genai-perf==0.0.16" "numpy<2"
  fi
}

job=${1:-serve}
shift || true
case "$job" in
  install) install ;;
  serve) install; exec "$VENV/bin/tritonmoe-serve" "$@" ;;
  test)
    install
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: scripts/dev.sh serve|test|install [args]" >&2; exit 2 ;;
esac
