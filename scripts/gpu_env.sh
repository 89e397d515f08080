# Source on the GPU machine, from the repository root, after scripts/gpu_payload.sh built .gpu/ here and the call
# carried it (`carry: [".gpu"]`): unpacks the Triton runtime, puts numpy<2 first on the path for the Python stub,
# and makes this checkout importable as `tritonmoe` without installing it.
set -e
root=/tmp/tritonmoe-gpu
if [ ! -x "$root/bin/perf_analyzer" ]; then
  mkdir -p "$root/site"
  tar -C "$root" -xJf .gpu/triton-runtime.tar.xz
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$root/site" .gpu/numpy-*.whl
fi
export PYTHONPATH="$root/site:$root:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$root/bin:$PATH"
export TRITONMOE_HOME=${TRITONMOE_HOME:-/tmp/tritonmoe-home}
set +e
