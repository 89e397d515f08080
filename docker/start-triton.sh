#!/usr/bin/env bash
# A server container's entry point: optionally a warm engine pool beside tritonserver, then the server itself.
# TRITONMOE_POOL_PER_DEVICE=N (default 0: no pool) keeps N warm engine workers per visible GPU on the socket
# $TRITONMOE_POOL_SOCKET; models whose config.pbtxt sets the parameter engine_pool to that path start in one of
# them (docs/loader.md, "Warm engine pool"). The pool ends with the server: its workers serve only this server.
set -euo pipefail
per_device=${TRITONMOE_POOL_PER_DEVICE:-0}
if [ "$per_device" -le 0 ]; then
  exec tritonserver "$@"
fi
socket=${TRITONMOE_POOL_SOCKET:-/run/tritonmoe/pool.sock}
mkdir -p "$(dirname "$socket")"
python3 -m tritonmoe.backend.engine_pool --socket "$socket" --per-device "$per_device" &
pool=$!
trap 'kill -TERM "$pool" 2>/dev/null; wait "$pool" 2>/dev/null' EXIT
tritonserver "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null' TERM INT  # the container's stop signal goes to the server
while true; do
  wait "$server" && status=0 || status=$?
  kill -0 "$server" 2>/dev/null || break  # ended, not just a signal interrupting the wait
done
exit "$status"
