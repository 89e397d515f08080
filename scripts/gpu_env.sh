# Source on the GPU machine, from the repository root, after scripts/gpu_payload.sh built .gpu/ here and the call
# carried it (`carry: [".gpu"]`): unpacks the Triton runtime and makes this checkout importable as `tritonmoe`
# without installing it. numpy 1.26 goes first on the path: the Triton 2.51 stub misreads BYTES inputs under numpy 2
# on that machine; its scipy and scikit-learn need numpy 2, so a sitecustomize hides them (transformers imports
# them only when present).
root=/tmp/tritonmoe-gpu
stamp=$(cat .gpu/* | cksum)
if [ "$stamp" != "$(cat "$root/payload.cksum" 2>/dev/null)" ]; then  # a warm machine may hold an older one
  rm -rf "$root" && mkdir -p "$root"
  tar -C "$root" -xJf .gpu/triton-runtime.tar.xz
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$root/site" .gpu/numpy-*.whl
  # sys.modules[name] = None makes `import name` fail and importlib.util.find_spec(name) return None, so
  # transformers treats them as not installed (they need numpy 2; we serve nothing that uses them)
  printf 'import sys\nfor _name in ("scipy", "sklearn"):\n    sys.modules.setdefault(_name, None)\n' \
    > "$root/site/sitecustomize.py"
  echo "$stamp" > "$root/payload.cksum"
fi
export PYTHONPATH="$root/site:$root:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$root/bin:$PATH"
export TRITONMOE_HOME=${TRITONMOE_HOME:-/tmp/tritonmoe-home}
