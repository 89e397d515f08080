# Source on the GPU machine, from the repository root, after scripts/gpu_payload.sh built .gpu/ here and the call
# carried it (`carry: [".gpu"]`): unpacks the Triton runtime, puts numpy<2 first on the path for the Python stub,
# and makes this checkout importable as `tritonmoe` without installing it.
set -e
root=/tmp/tritonmoe-gpu
if [ ! -f "$root/site/sklearn/metrics.py" ]; then
  mkdir -p "$root/site"
  tar -C "$root" -xJf .gpu/triton-runtime.tar.xz
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$root/site" .gpu/numpy-*.whl
  # That machine's scikit-learn and scipy need numpy>=2, and transformers 5.17 imports sklearn.metrics at start-up
  # when it is installed (for assisted generation only). Shadow it with a stand-in that refuses to be used.
  mkdir -p "$root/site/sklearn"
  echo '"""Stand-in: the real scikit-learn needs numpy>=2, and the Triton 2.51 stub needs numpy<2."""' \
    > "$root/site/sklearn/__init__.py"
  printf 'def roc_curve(*args, **kwargs):\n    raise ImportError("scikit-learn is shadowed on this machine (numpy<2)")\n' \
    > "$root/site/sklearn/metrics.py"
fi
export PYTHONPATH="$root/site:$root:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$root/bin:$PATH"
export TRITONMOE_HOME=${TRITONMOE_HOME:-/tmp/tritonmoe-home}
set +e
