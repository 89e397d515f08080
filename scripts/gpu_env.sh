# Source on the GPU machine, from the repository root, after scripts/gpu_payload.sh built .gpu/ here and the call
# carried it (`carry: [".gpu"]`): unpacks the Triton runtime and makes this checkout importable as `tritonmoe`
# without installing it. That machine's numpy 2 is kept: its scipy and scikit-learn (which transformers imports)
# need it, and the Triton 2.51 stub served our tests with numpy 2.2 on the CPU machine.
root=/tmp/tritonmoe-gpu
if ! cmp -s .gpu/triton-runtime.tar.xz "$root/payload.tar.xz"; then  # a warm machine may hold an older one
  rm -rf "$root" && mkdir -p "$root"
  tar -C "$root" -xJf .gpu/triton-runtime.tar.xz && cp .gpu/triton-runtime.tar.xz "$root/payload.tar.xz"
fi
export PYTHONPATH="$root:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$root/bin:$PATH"
export TRITONMOE_HOME=${TRITONMOE_HOME:-/tmp/tritonmoe-home}
