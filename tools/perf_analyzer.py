"""Run the ``perf_analyzer`` that ``tritonclient[all]==2.51.0`` installs, with the libraries it needs.

It links ``libb64.so.0d`` and ``libcudart.so.12``: the pytriton wheel carries the first (under a mangled name, so
we point a private symlink at it) and the ``nvidia-cuda-runtime-cu12`` wheel the second. No system packages needed.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .tritonserver import TritonError, tritonmoe_home


def binary() -> Path:
    path = Path(sys.executable).parent / "perf_analyzer"
    found = path if path.exists() else shutil.which("perf_analyzer")
    if not found:
        raise TritonError("perf_analyzer not found: it comes with tritonclient[all]==2.51.0 (scripts/dev.sh installs it)")
    return Path(found)


def _link(shim: Path, name: str, libs: Path, pattern: str) -> None:
    link = shim / name
    if link.exists():
        return
    candidates = sorted(libs.glob(pattern))
    if not candidates:
        raise TritonError(f"no {pattern} in {libs}")
    tmp = shim / f".{name}.{os.getpid()}"
    tmp.symlink_to(candidates[0])
    os.replace(tmp, link)  # atomic: concurrent first runs race safely


def _cudart12_dir() -> Path | None:
    try:
        import nvidia.cuda_runtime
    except ImportError:
        return None
    lib = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    return lib if (lib / "libcudart.so.12").exists() else None


def env() -> dict:
    import pytriton

    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    shim = tritonmoe_home() / "lib"
    shim.mkdir(parents=True, exist_ok=True)
    _link(shim, "libb64.so.0d", libs, "libb64-*.so.0d")
    dirs = [shim]
    cudart = _cudart12_dir()
    if cudart is None:  # a CUDA 13 machine: the server wheel's own CUDA 12 runtime serves perf_analyzer too
        _link(shim, "libcudart.so.12", libs, "libcudart-*.so.12*")
    else:
        dirs.append(cudart)
    e = dict(os.environ)
    e["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, dirs), e.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return e


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary()), *args], env=env(), capture_output=True, text=True, timeout=timeout)


def read_csv(path: str | Path) -> list[dict]:
    """perf_analyzer's ``-f`` report: one row per load level."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
