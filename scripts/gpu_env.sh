# Source on the GPU machine, from the repository root, after scripts/gpu_payload.sh built .gpu/ here and the call
# carried it (`carry: [".gpu"]`): unpacks the Triton runtime and makes this checkout importable as `tritonmoe`
# without installing it. numpy 2.4 goes first on the path: the Triton 2.51 stub misreads BYTES inputs under that
# machine's numpy 2.5, and its scipy and scikit-learn (which transformers imports) need numpy 2.
root=/tmp/tritonmoe-gpu
if ! cmp -s .gpu/triton-runtime.tar.xz "$root/payload.tar.xz"; then  # a warm machine may hold an older one
  rm -rf "$root" && mkdir -p "$root"
  tar -C "$root" -xJf .gpu/triton-runtime.tar.xz
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$root/site" .gpu/numpy-*.whl
  cp .gpu/triton-runtime.tar.xz "$root/payload.tar.xz"
fi
export PYTHONPATH="$root/site:$root:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$root/bin:$PATH"
export TRITONMOE_HOME=${TRITONMOE_HOME:-/tmp/tritonmoe-home}
