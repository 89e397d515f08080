# Thin shim: the whole model lives in the tritonmoe package (backend/triton_model.py, backend/serving.py).
from tritonmoe.backend.triton_model import TritonPythonModel  # noqa: F401
