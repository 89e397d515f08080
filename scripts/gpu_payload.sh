#!/usr/bin/env bash
# Build .gpu/: what the GPU machine lacks to serve through Triton, small enough to travel with the working tree
# (64 MiB per call). That machine has Python 3.12, torch and numpy 2 but no tritonserver. We carry a trimmed server
# (the 3.12 stub only, no bundled libpython), perf_analyzer, tritonclient's Python modules and a numpy 1.26 wheel. On the GPU machine: `source scripts/gpu_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=.gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p "$out"
site=$("$PY" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent.parent)')
bin=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/pytriton" "$stage/bin"
touch "$stage/pytriton/__init__.py"  # tools/tritonserver.py finds the server through `import pytriton`
cp -r "$site/pytriton/tritonserver" "$stage/pytriton/"
find "$stage/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
cp -r "$site/nvidia_pytriton.libs" "$stage/"
rm -f "$stage"/nvidia_pytriton.libs/libpython3-*  # pytriton's own interpreter; the stub links the system one
cp "$bin/perf_analyzer" "$stage/bin/"
# the pure-Python clients (model config protobufs, gRPC client); their HTTP client's gevent is not carried
cp -r "$site/tritonclient" "$stage/"
find "$stage/tritonclient" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$stage" -cJf "$out/triton-runtime.tar.xz" pytriton nvidia_pytriton.libs bin tritonclient
# Triton 2.51's stub (pybind11 2.10) builds input arrays through numpy's C API and misreads BYTES inputs under numpy
# 2.x there (seen with 2.4 and 2.5 on Python 3.12): carry numpy 1.26. gpu_env.sh hides that machine's scipy and
# scikit-learn, which need numpy 2 and which transformers imports only when they are installed.
rm -f "$out"/numpy-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" "numpy==1.26.4"
du -ch "$out"/* | tail -1
