# Source on the GPU machine, from the repository root, after scripts/gpu_payload.sh built .gpu/ here and the call
# carried it (`carry: [".gpu"]`): unpacks the Triton runtime, makes a venv layered over the machine's packages
# with numpy 1.26 in front, and makes this checkout importable as `tritonmoe` without installing it.
#
# Why a venv and not PYTHONPATH: Triton 2.51's stub (pybind11 2.10) misreads BYTES inputs under numpy 2 (every
# element stride 0), and the stub ignores PYTHONPATH: its interpreter takes its packages from the first python on
# PATH. That machine's scipy and scikit-learn need numpy 2, so a .pth hook hides them (transformers imports
# them only when present; nothing we serve uses them).
root=/tmp/tritonmoe-gpu
stamp=$(cat .gpu/* "${BASH_SOURCE[0]}" | cksum)  # the payload and this recipe
if [ "$stamp" != "$(cat "$root/payload.cksum" 2>/dev/null)" ]; then  # a warm machine may hold an older one
  rm -rf "$root" && mkdir -p "$root"
  tar -C "$root" -xJf .gpu/triton-runtime.tar.xz
  base=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -m venv --without-pip "$root/venv"
  site=$("$root/venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/numpy-*.whl
  echo "$base" > "$site/zz_machine_packages.pth"  # after the venv's own numpy
  # a .pth "import" line runs at start-up in every interpreter of this venv (Ubuntu's own sitecustomize would
  # shadow ours)
  echo 'import sys; [sys.modules.setdefault(n, None) for n in ("scipy", "sklearn")]' > "$site/00_hide_numpy2_only.pth"
  echo "$stamp" > "$root/payload.cksum"
fi
export PATH="$root/venv/bin:$root/bin:$PATH"
export PYTHONPATH="$root:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITONMOE_HOME=${TRITONMOE_HOME:-/tmp/tritonmoe-home}
