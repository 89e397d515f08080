"""Run a real ``tritonserver`` 2.51 from the ``nvidia-pytriton`` wheel as a plain server process.

The wheel carries the server, the Python backend and one backend stub per Python version. We lay out a runtime
folder once (the server tree plus the stub matching this interpreter), then start servers over any model
repository on loopback ports, wait until they are ready, and stop them cleanly. Tests, the main job, benchmarks
and the router's multi-server mode all start servers through :class:`TritonServer`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

TRITON_VERSION = "2.51.0"
# sysconfig fills its variables lazily and not thread-safely: servers started from several threads at once could
# read LIBDIR as None and start without libpython on LD_LIBRARY_PATH. Fill them once, here.
sysconfig.get_config_vars()


class TritonError(RuntimeError):
    """The server could not be prepared, started or reached."""


def tritonmoe_home() -> Path:
    """Where tritonmoe keeps its caches (runtime, built models): ``$TRITONMOE_HOME`` or ``~/.cache/tritonmoe``."""
    return Path(os.environ.get("TRITONMOE_HOME", Path.home() / ".cache" / "tritonmoe")).expanduser()


def _pytriton_root() -> tuple[Path, Path]:
    try:
        import pytriton
    except ImportError as e:  # pragma: no cover - install problem
        raise TritonError("nvidia-pytriton==0.7.0 is not installed; run scripts/setup.sh") from e
    pkg = Path(pytriton.__file__).parent
    server, libs = pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").exists():
        raise TritonError(f"no tritonserver binary under {server}")
    return server, libs


def runtime_dir() -> Path:
    """A server tree with the stub for this Python, built once per interpreter version."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    dest = tritonmoe_home() / f"tritonserver-{TRITON_VERSION}-py{py}"
    if (dest / "bin" / "tritonserver").exists():
        return dest
    src, _ = _pytriton_root()
    stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonError(f"the pytriton wheel has no Python backend stub for Python {py}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".runtime-"))
    shutil.copytree(src, tmp / "t", ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, tmp / "t" / "backends" / "python" / "triton_python_backend_stub")
    try:
        os.rename(tmp / "t", dest)  # atomic: concurrent first runs race safely
    except OSError:
        if not (dest / "bin" / "tritonserver").exists():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def server_env(base: dict | None = None) -> dict:
    """Environment for the server and its stubs: libpython of this interpreter and the wheel's libraries first."""
    env = dict(os.environ if base is None else base)
    _, libs = _pytriton_root()
    libdirs = [sysconfig.get_config_var("LIBDIR"), str(libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    # The stub's embedded interpreter finds its site-packages from the first python on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


_GIVEN_PORTS: set[int] = set()  # every port free_port handed out in this process
_GIVEN_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS calls free now, never one this process was given before: the OS can hand the same ephemeral
    port to two calls in a row (one server's HTTP and gRPC ports, which tritonserver refuses with its usage text),
    and a port given out may not be bound yet."""
    with _GIVEN_LOCK:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _GIVEN_PORTS:
                _GIVEN_PORTS.add(port)
                return port
    raise OSError(f"no free port on {host} that this process has not handed out already")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class TritonServer:
    """One ``tritonserver`` process on loopback.

    >>> with TritonServer("model_repository", models=["tiny_moe"]) as server:
    ...     print(server.http_url)
    """

    def __init__(self, model_repository: str | os.PathLike, *, models: list[str] | None = None,
                 http_port: int | None = None, grpc_port: int | None = None, metrics_port: int | None = None,
                 host: str = "127.0.0.1", log_path: str | os.PathLike | None = None, verbose: int = 0,
                 extra_args: list[str] | None = None, env: dict | None = None, exit_timeout: int = 10):
        self.model_repository = Path(model_repository).resolve()
        self.models = list(models or [])
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.verbose = verbose
        self.exit_timeout = exit_timeout  # seconds Triton waits for open connections and requests at shutdown
        self.extra_args = list(extra_args or [])
        self.env = env
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        rt = runtime_dir()
        cmd = [str(rt / "bin" / "tritonserver"), f"--model-repository={self.model_repository}",
               f"--backend-directory={rt / 'backends'}", "--model-control-mode=explicit",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", "--strict-readiness=false", f"--log-verbose={self.verbose}",
               f"--exit-timeout-secs={self.exit_timeout}"]
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if not self.model_repository.is_dir():
            raise TritonError(f"model repository {self.model_repository} is not a folder")
        for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            if port_in_use(port, self.host):
                raise TritonError(f"{name} port {port} on {self.host} is already in use; choose another port")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=server_env(self.env), start_new_session=True)
        log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait for the server to answer and for every model it was started with to be READY."""
        deadline = time.monotonic() + timeout
        paths = ["/v2/health/live"] + [f"/v2/models/{m}/ready" for m in self.models]
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonError(f"tritonserver exited with code {self.proc.returncode}:\n{self.exit_reason()}")
            if all(self._get(p) == 200 for p in paths):
                return
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, urllib.error.URLError):
            return 0

    def exit_reason(self) -> str:
        """The end of the server's output; for an argument it refused, just the reason (its last line, after
        400 lines of usage text)."""
        text = self.log_tail()
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            if f.read(200).lstrip().startswith("Usage: tritonserver") and text.strip():
                return text.strip().splitlines()[-1]
        return text

    def log_tail(self, chars: int = 6000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT (Triton's graceful shutdown: unloads models, calls ``finalize``), then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            # the server died (killed, crashed): its Python stubs, in its process group, outlive it; end them
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
