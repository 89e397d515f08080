"""The command-line tools: the main job, perf_analyzer against the served model, and the tiny-model factory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tritonmoe.tools import perf_analyzer, tiny_models
from tritonmoe.tools.tritonserver import free_port


def test_tiny_model_factory_writes_hf_checkpoints_with_per_expert_keys(tmp_path):
    out = tmp_path / "m"
    assert tiny_models.main(["qwen3_moe", str(out), "--layers", "3", "--experts", "4", "--top-k", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["num_local_experts"]) == ("qwen3_moe", 3, 4)
    keys = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    assert len(list(out.glob("*.safetensors"))) > 1, "the factory should shard the weights"
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in keys
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    # a different model in the same folder is refused; the same one is reused
    assert tiny_models.main(["qwen3_moe", str(out), "--layers", "2"]) == 2
    assert tiny_models.main(["qwen3_moe", str(out), "--layers", "3", "--experts", "4", "--top-k", "2"]) == 0
    with pytest.raises(ValueError, match="top_k"):
        tiny_models.TinySpec(arch="mixtral", experts=2, top_k=3)


def _serve(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tritonmoe.tools.serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.e2e
def test_main_job_serves_and_streams_with_timings(tmp_path):
    ports = [str(free_port()) for _ in range(3)]
    r = _serve("--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-tokens", "12",
               "--arch", "deepseek_v2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model 'tiny_moe' loaded in" in r.stdout
    assert "finish reason: length; 12 tokens; time to first token" in r.stdout
    assert "tokens/s" in r.stdout and "stopping tritonserver" in r.stdout


def test_main_job_says_clearly_when_a_port_is_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve("--http-port", str(port), "--grpc-port", str(free_port()))
    assert r.returncode == 1
    assert f"HTTP port {port} on 127.0.0.1 is already in use" in r.stdout


@pytest.mark.e2e
def test_perf_analyzer_streaming_smoke_run(triton, tmp_path):
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"text_input": ["def add(a, b):"], "stream": [True],
                                          "sampling_parameters": [json.dumps({"max_tokens": 8, "ignore_eos": True})]}]}))
    report = tmp_path / "report.csv"
    r = perf_analyzer.run(["-m", "moe_mixtral", "-i", "grpc", "--streaming", "--async", "-u", triton.grpc_url,
                           "--input-data", str(data), "--concurrency-range", "1:2", "--measurement-interval", "1500",
                           "--stability-percentage", "100", "-f", str(report)], timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = perf_analyzer.read_csv(report)
    assert sorted(int(row["Concurrency"]) for row in rows) == [1, 2]  # rows come sorted by throughput
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)


def test_main_job_with_the_loader_serves_the_same_tokens(tmp_path):
    """--loader: convert once, start a loader service, load through its DRAM cache; same greedy text, and the
    job's shared-memory cache is gone afterwards."""
    ports = [str(free_port()) for _ in range(3)]
    common = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-tokens", "10",
              "--arch", "olmoe"]
    plain = _serve(*common)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    r = _serve(*common, "--loader", "--log", str(tmp_path / "server.log"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loader service up at http://127.0.0.1:" in r.stdout
    log = (tmp_path / "server.log").read_text()
    assert "through the loader" in log and "dram_fill" in log

    def completion(out: str) -> str:
        return out.split("prompt:", 1)[1].split("finish reason:", 1)[0]

    assert completion(r.stdout) == completion(plain.stdout)
    assert not list(Path("/dev/shm").glob(f"tritonmoe-main-loader-{os.getuid()}/*"))


def test_main_job_with_the_disk_tier_serves_the_same_tokens(tmp_path):
    """--param expert_host_tier=disk: the job converts the default checkpoint once and serves it offloaded with
    the experts read from the converted files; same greedy text as resident."""
    ports = [str(free_port()) for _ in range(3)]
    common = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-tokens", "10",
              "--arch", "qwen3_moe"]
    plain = _serve(*common)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    r = _serve(*common, "--param", "expert_cache_budget=25%", "--param", "expert_host_tier=disk",
               "--log", str(tmp_path / "server.log"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the host tier is the checkpoint's files on disk" in (tmp_path / "server.log").read_text()

    def completion(out: str) -> str:
        return out.split("prompt:", 1)[1].split("finish reason:", 1)[0]

    assert completion(r.stdout) == completion(plain.stdout)


def test_main_job_through_the_router_serves_the_same_tokens():
    """--router 2: two tritonservers behind the router; the first request loads the model on one of them and the
    completion streams through the router: the same greedy text as the plain main job; everything stops after."""
    ports = [str(free_port()) for _ in range(3)]
    common = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-tokens", "10",
              "--arch", "qwen3_moe"]
    plain = _serve(*common)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    router_port = free_port()
    r = _serve(*common, "--router", "2", "--router-port", str(router_port))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 tritonservers up in" in r.stdout
    assert f"router up at http://127.0.0.1:{router_port} over 2 servers" in r.stdout
    served_by = r.stdout.split("served by ", 1)[1].split(" (of h0, h1)", 1)[0]
    assert served_by in ("h0", "h1"), r.stdout

    def completion(out: str) -> str:
        return out.split("prompt:", 1)[1].split("finish reason:", 1)[0]

    assert completion(r.stdout) == completion(plain.stdout)
    with pytest.raises(ConnectionRefusedError):  # the router is gone: nothing listens on its port
        socket.create_connection(("127.0.0.1", router_port), timeout=5).close()


def test_main_job_router_mode_says_clearly_when_its_port_is_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve("--router", "2", "--router-port", str(port), "--http-port", str(free_port()))
    assert r.returncode == 1
    assert f"router port {port} on 127.0.0.1 is already in use" in r.stdout


def test_main_job_with_the_pool_and_the_loader_serves_the_same_tokens(tmp_path):
    """--pool (with --loader: the fast-start path): a warm engine pool starts beside the server, the model's engine
    runs in one of its workers and the stub never imports torch; same greedy text as in-process; the pool and its
    socket are gone afterwards."""
    ports = [str(free_port()) for _ in range(3)]
    common = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-tokens", "10",
              "--arch", "qwen2_moe"]
    plain = _serve(*common)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    r = _serve(*common, "--pool", "--loader", "--log", str(tmp_path / "server.log"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engine pool up at " in r.stdout and "loader service up at http://127.0.0.1:" in r.stdout
    log = (tmp_path / "server.log").read_text()
    assert "this stub imported torch: no" in log and "through the loader" in log

    def completion(out: str) -> str:
        return out.split("prompt:", 1)[1].split("finish reason:", 1)[0]

    assert completion(r.stdout) == completion(plain.stdout)
    socket_path = r.stdout.split("engine pool up at ", 1)[1].split(" ", 1)[0]
    assert not Path(socket_path).exists() and not Path(socket_path).parent.exists()


def test_bench_startup_reports_a_failing_path_and_measures_the_others(tmp_path, monkeypatch):
    """A path whose model loads but cannot generate (on the H200, a pre-pinned pool worker did that) is reported as
    failed in the table and the JSON, unloaded, and not tried again; the other paths are still measured. The
    failure is injected into the client's first loader-path generate; server, loader and loads are real."""
    from tritonmoe.tools import bench_startup
    from tritonmoe.tools.client import GenerateError

    real, calls = bench_startup.generate, []

    def generate_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # round 1: hf, then loader
            raise GenerateError(400, "generation failed: injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_startup, "generate", generate_failing_once)
    kernels = tmp_path / "torch-kernels"
    (kernels / "sub").mkdir(parents=True)
    (kernels / "sub" / "k1.cubin").write_bytes(b"x")
    monkeypatch.setenv("PYTORCH_KERNEL_CACHE_PATH", str(kernels))  # (the servers' stubs inherit it too)
    out = tmp_path / "startup.json"
    assert bench_startup.main(["--gb", "0.3", "--paths", "hf,loader", "--repeat", "2", "--no-warmup",
                               "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["failed"] == {"loader": "GenerateError: HTTP 400: generation failed: injected"}
    assert list(result["paths"]) == ["hf"] and len(result["paths"]["hf"]["runs"]) == 2
    assert len(calls) == 3  # hf, loader (failed), hf: the loader path was not tried again
    cache = result["torch_kernel_cache"]  # recorded before and after, where torch would look
    assert cache["before"] == {"path": str(kernels), "files": 1} and cache["after"]["files"] >= 1


def test_bench_startup_plot_draws_stacked_bars_from_result_files_and_names_a_missing_one(tmp_path):
    """``--plot`` runs no benchmark: it reads result JSONs (pool path with pool phases, hf with weights) and writes
    a PNG; a missing result file stops it with the file's name."""
    import matplotlib.image

    from tritonmoe.tools import bench_startup

    def result(name, date, scale):
        run = lambda load, phases: {"load_s": load * scale, "first_token_s": 0.1, "total_s": load * scale + 0.1,  # noqa: E731
                                    "phases": phases}
        pool = run(1.0, {"pool_claim": 0.01, "gpu_copy": 0.6, "build": 0.1, "worker_load": 0.8})
        hf = run(10.0, {"tokenizer": 0.01, "weights": 6.0})
        paths = {"pool": {"median": pool, "best": pool, "runs": [pool, pool]},
                 "hf": {"median": hf, "best": hf, "runs": [hf]}}
        f = tmp_path / name
        f.write_text(json.dumps({"gpu": "NVIDIA H200", "gb": 15.7, "date": date, "paths": paths}))
        return str(f)

    a, b = result("a.json", "2026-11-30T18:04:09+00:00", 1.5), result("b.json", "2026-11-30T18:37:16+00:00", 1.0)
    png = tmp_path / "fig" / "startup.png"
    assert bench_startup.main(["--plot", a, b, "--plot-labels", "x,y", "--plot-path", str(png)]) == 0
    image = matplotlib.image.imread(png)
    assert image.shape[1] > 300 and image.shape[0] > 100 and image.std() > 0.01

    with pytest.raises(SystemExit, match="missing.json"):
        bench_startup.main(["--plot", a, str(tmp_path / "missing.json"), "--plot-path", str(tmp_path / "m.png")])


def test_docker_entry_point_runs_a_pool_beside_the_server_and_ends_it_with_the_server(tmp_path):
    """docker/start-triton.sh with TRITONMOE_POOL_PER_DEVICE=1: a real engine pool (CPU) gets warm on the socket
    while the server runs with the script's arguments; a SIGTERM ends the server and then the pool. Without the
    variable the script execs the server alone. (The server here is a stand-in that records its arguments: this
    tests the script, not tritonserver.)"""
    import signal
    import time

    from tritonmoe.backend.engine_pool import PoolError, pool_status

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "tritonserver"
    fake.write_text('#!/usr/bin/env bash\necho "$@" > "$ARGS_FILE"\ntrap "exit 0" TERM\n'
                    'while true; do sleep 0.1; done\n')
    fake.chmod(0o755)
    script = Path(__file__).resolve().parent.parent / "docker" / "start-triton.sh"
    sock = tmp_path / "run" / "pool.sock"
    env = dict(os.environ, PATH=f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               ARGS_FILE=str(tmp_path / "args"), TRITONMOE_POOL_PER_DEVICE="1", TRITONMOE_POOL_SOCKET=str(sock),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(["bash", str(script), "--model-repository=/models", "--exit-timeout-secs=10"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            try:
                status = pool_status(str(sock))
                if sum(status["warm"].values()) >= 1:
                    break
            except PoolError:
                pass
            time.sleep(0.3)
        assert status and sum(status["warm"].values()) == 1, status
        assert (tmp_path / "args").read_text().split() == ["--model-repository=/models", "--exit-timeout-secs=10"]
        workers = [w["pid"] for w in status["workers"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (sock.exists() or any(Path(f"/proc/{p}").exists() for p in workers)):
            time.sleep(0.2)
        assert not sock.exists(), "the pool outlived the server"
        assert not any(Path(f"/proc/{p}").exists() for p in workers), "a warm worker outlived the pool"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # without the variable: the server alone, with the same arguments
    env.pop("TRITONMOE_POOL_PER_DEVICE")
    (tmp_path / "args").unlink()
    alone = subprocess.Popen(["bash", str(script), "--model-repository=/m2"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "args").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "args").read_text().split() == ["--model-repository=/m2"]
        alone.terminate()
        assert alone.wait(30) == 0
    finally:
        if alone.poll() is None:
            alone.kill()


def test_free_port_never_hands_out_the_same_port_twice(monkeypatch):
    """The OS may return the same ephemeral port to two binds in a row; one server's HTTP and gRPC ports must still
    differ (tritonserver refuses equal ports with its usage text, a flake seen in CI)."""
    from tritonmoe.tools import tritonserver

    offered = iter([50001, 50001, 50001, 50002, 50003])

    class FakeSocket:
        def __init__(self, *args):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(tritonserver, "_GIVEN_PORTS", set())
    monkeypatch.setattr(tritonserver.socket, "socket", FakeSocket)
    assert [tritonserver.free_port(), tritonserver.free_port(), tritonserver.free_port()] == [50001, 50002, 50003]


def test_a_server_that_refuses_its_arguments_says_why_in_one_line(tmp_path):
    """tritonserver answers a bad argument (here: the same HTTP and gRPC port) with 400 lines of usage and the
    reason last; the error names the reason."""
    from tritonmoe.tools.tritonserver import TritonError, TritonServer

    port = free_port()
    server = TritonServer(tmp_path / "repo", http_port=port, grpc_port=port, log_path=tmp_path / "server.log")
    (tmp_path / "repo").mkdir()
    try:
        with pytest.raises(TritonError) as e:
            server.start(timeout=60)
    finally:
        server.stop()
    assert "cannot listen to HTTP requests and GRPC requests at the same address and port" in str(e.value)
    assert "Rate Limiter" not in str(e.value) and len(str(e.value).splitlines()) == 2


def test_plot_offload_trace_refuses_what_is_not_a_trace(tmp_path):
    """The plotting tool says what is wrong with a file it cannot read, and exits 2."""
    bad = tmp_path / "not_a_trace.jsonl"
    bad.write_text('{"step": 1}\n')
    out = subprocess.run([sys.executable, "-m", "tritonmoe.tools.plot_offload_trace", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "before any header" in out.stderr
    bad.write_text("not json\n")
    out = subprocess.run([sys.executable, "-m", "tritonmoe.tools.plot_offload_trace", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not a JSON line" in out.stderr


def test_plot_offload_trace_reads_a_trace_written_before_a_field_existed(tmp_path):
    """A trace from an older engine (no ``disk_bytes`` column) still summarises: the missing field reads as zeros,
    the others as written."""
    import json as _json

    from tritonmoe.backend.offload.trace_file import FIELDS
    from tritonmoe.tools.plot_offload_trace import summarize

    old_fields = [f for f in FIELDS if f != "disk_bytes"]
    lines = [{"trace": "tritonmoe.offload", "version": 1, "model": "m", "layers": 2, "fields": old_fields}]
    for step in (1, 2):
        record = {"step": step, "t": 0.1 * step, "running": 1, "step_s": 0.01}
        record.update({f: ([0.001, 0.002] if f.endswith("_s") else [3, 1]) for f in old_fields})
        lines.append(record)
    path = tmp_path / "old.jsonl"
    path.write_text("".join(_json.dumps(r) + "\n" for r in lines))
    totals, arrays, _, _ = summarize(str(path))
    assert totals["disk_bytes"] == 0 and arrays["disk_bytes"].shape == (2, 2)
    assert totals["uses"] == 8 and totals["bytes_moved"] == 16
