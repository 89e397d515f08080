# Sourced by the offloading GPU scripts, from the repository root: lays the package out under /tmp (the checkout's
# tritonmoe/ folder would shadow it) and puts it on PYTHONPATH; cuda-python from runs/wheels where the machine lacks it.
pkg=/tmp/offload-pkg
rm -rf "$pkg" && mkdir -p "$pkg/tritonmoe"
cp tritonmoe/__init__.py "$pkg/tritonmoe/" && cp -r backend "$pkg/tritonmoe/backend" && cp -r tools "$pkg/tritonmoe/tools"
export PYTHONPATH=$pkg PYTHONUNBUFFERED=1
if ! python3 -c "import cuda.bindings.runtime" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site runs/wheels/*.whl && export PYTHONPATH=$pkg:/tmp/site
fi
