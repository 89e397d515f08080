"""The warm engine pool through a real tritonserver and a real pool process (tritonmoe-engine-pool): models whose
``engine_pool`` parameter names the pool's socket run their engine in a pre-started worker, and their stubs never
import torch. Greedy tokens equal transformers'; a pool that is not running, a bad parameter and a killed worker
fail clearly (no hang); an unload ends the worker and the pool is back to its warm count; with ``loader_url`` the
weights come from a real loader service's DRAM cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import PROMPTS, write_model
from test_triton_e2e import grpc_stream, metric
from tritonmoe.backend.engine_pool import PoolError, claim_worker, pool_status
from tritonmoe.tools.client import GenerateError, generate, generate_stream
from tritonmoe.tools.tritonserver import TritonServer

pytestmark = pytest.mark.e2e


class Pool:
    """One ``python -m tritonmoe.backend.engine_pool`` process on a short socket path, its log in ``log``."""

    def __init__(self, log: Path, per_device: int = 1, *extra: str):
        self.dir = Path(tempfile.mkdtemp(prefix="tmoe-pool-test-"))
        self.socket = str(self.dir / "pool.sock")
        self.log, self.per_device, self.extra = log, per_device, extra
        self.proc = None

    def start(self) -> "Pool":
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "tritonmoe.backend.engine_pool", "--socket",
                                          self.socket, "--devices", "cpu", "--per-device", str(self.per_device),
                                          *self.extra],
                                         stdout=f, stderr=subprocess.STDOUT)
        self.wait_warm()
        return self

    def status(self) -> dict:
        return pool_status(self.socket)

    def wait_warm(self, timeout: float = 180) -> dict:
        """Until the pool has its warm count and no claimed worker is left (returns the status)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                s = self.status()
                if s["warm"]["cpu"] == self.per_device and all(w["state"] != "claimed" for w in s["workers"]):
                    return s
            except PoolError:
                pass
            assert time.monotonic() < deadline, f"the pool did not get warm:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.2)

    def worker_of(self, model: str) -> int:
        [pid] = [w["pid"] for w in self.status()["workers"] if w["state"] == "claimed" and w["model"] == model]
        return pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _server_log_with(server, text: str, timeout: float = 15) -> str:
    """The server's log once it has ``text``: a stub's log lines reach the file a moment after ``load`` returns."""
    deadline = time.monotonic() + timeout
    while text not in (log := server.log_path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return log


def _gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a child of the pool stays a zombie until the pool reaps it: that counts as gone
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """A real pool (1 warm CPU worker) and a real tritonserver with nothing loaded yet."""
    logs = tmp_path_factory.mktemp("pool-logs")
    pool = Pool(logs / "pool.log").start()
    repo = tmp_path_factory.mktemp("pool-repo")
    server = TritonServer(repo, log_path=logs / "tritonserver.log")
    try:
        server.start(timeout=300)
        server.repo, server.pool = repo, pool
        yield server
    finally:
        server.stop()
        pool.stop()


def test_pooled_model_equals_transformers_and_its_stub_never_imports_torch(pooled, tiny, reference):
    pool = pooled.pool
    write_model(pooled.repo, "pooled", tiny("mixtral"), engine_pool=pool.socket)
    client = httpclient.InferenceServerClient(pooled.http_url, network_timeout=300)
    try:
        client.load_model("pooled")
        assert client.is_model_ready("pooled")
        pid = pool.worker_of("pooled")
        log = _server_log_with(pooled, f"in engine worker pid {pid} of the pool {pool.socket}")
        assert "this stub imported torch: no" in log

        ids, text = reference(tiny("mixtral"), PROMPTS[0], 12)
        r = generate(pooled.http_url, "pooled", PROMPTS[0], max_tokens=12)
        assert r["text_output"] == PROMPTS[0] + text and r["num_output_tokens"] == len(ids)
        events = list(generate_stream(pooled.http_url, "pooled", PROMPTS[0], max_tokens=12))
        assert "".join(e["text_output"] for e in events) == text
        assert [t for e in events for t in (e["output_token_ids"] if isinstance(e["output_token_ids"], list)
                                            else [e["output_token_ids"]])] == ids
        _, text2 = reference(tiny("mixtral"), PROMPTS[2], 10)
        texts, final = grpc_stream(pooled, "pooled", PROMPTS[2].encode(), {"max_tokens": 10})
        assert not isinstance(final, Exception) and "".join(texts) == text2

        # a malformed request is refused by the worker (it has the tokenizer) with the usual 400
        req = urllib.request.Request(f"http://{pooled.http_url}/v2/models/pooled/generate",
                                     data=json.dumps({"text_input": "hi", "parameters": {"max_tokens": 0}}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400 and "'max_tokens' must be >= 1" in json.loads(e.value.read())["error"]

        # the worker's numbers reach Triton's /metrics
        time.sleep(0.5)
        # the first step is logged with the page faults since the model was ready (the GPU diagnosis of a slow
        # first token): in the pool's log, where the worker's stderr goes
        assert re.search(rf"\[engine-worker {pid}\] INFO first engine step of this model: [0-9.]+s \(\d+ running; "
                         r"page faults since ready: \d+ major, \d+ minor\)", pool.log.read_text())
        assert metric(pooled, "tritonmoe_generation_tokens_total", model="pooled") >= 12 + 12 + 10
        assert metric(pooled, "tritonmoe_time_to_first_token_seconds_count", model="pooled") >= 3
        assert metric(pooled, "tritonmoe_engine_step_seconds_count", model="pooled") > 0
        assert metric(pooled, "tritonmoe_requests_total", model="pooled", outcome="invalid") >= 1
        for phase in ("pool_claim", "weights", "tokenizer", "worker_load"):
            assert metric(pooled, "tritonmoe_startup_seconds", model="pooled", phase=phase) > 0, phase

        # unload: the worker exits and the pool is back to its warm count
        client.unload_model("pooled")
        assert _gone(pid), f"worker {pid} still running after the unload"
        status = pool.wait_warm()
        assert pid not in [w["pid"] for w in status["workers"]]
    finally:
        client.close()


def test_pool_not_running_or_bad_parameters_fail_the_load_clearly(pooled, tiny, tmp_path):
    client = httpclient.InferenceServerClient(pooled.http_url, network_timeout=300)
    try:
        nowhere = str(tmp_path / "no-pool.sock")
        write_model(pooled.repo, "no_pool", tiny("mixtral"), engine_pool=nowhere)
        with pytest.raises(InferenceServerException, match=f"cannot reach the engine pool at {nowhere}"):
            client.load_model("no_pool")
        assert not client.is_model_ready("no_pool")

        write_model(pooled.repo, "relative_pool", tiny("mixtral"), engine_pool="pool.sock")
        with pytest.raises(InferenceServerException, match="'engine_pool' must be the absolute path"):
            client.load_model("relative_pool")

        # a parameter error found by the worker fails the load with the same message as in-process
        write_model(pooled.repo, "pool_badparam", tiny("mixtral"), engine_pool=pooled.pool.socket,
                    max_num_seqs="lots")
        with pytest.raises(InferenceServerException, match="'max_num_seqs' must be an integer"):
            client.load_model("pool_badparam")
        assert not client.is_model_ready("pool_badparam")
        write_model(pooled.repo, "pool_missing", tmp_path / "nowhere", engine_pool=pooled.pool.socket)
        with pytest.raises(InferenceServerException, match=r"checkpoint folder .*nowhere does not exist"):
            client.load_model("pool_missing")
        assert not client.is_model_ready("pool_missing")
        pooled.pool.wait_warm()  # the failed workers exited; their replacements are warm
    finally:
        client.close()


def test_a_killed_worker_fails_open_and_later_requests_clearly(pooled, tiny):
    pool = pooled.pool
    pool.wait_warm()
    write_model(pooled.repo, "doomed", tiny("olmoe"), engine_pool=pool.socket, max_model_len="4096")
    client = httpclient.InferenceServerClient(pooled.http_url, network_timeout=300)
    try:
        client.load_model("doomed")
        pid = pool.worker_of("doomed")
        events, failure = [], []

        def long_stream():
            try:
                for e in generate_stream(pooled.http_url, "doomed", PROMPTS[1], max_tokens=4000, ignore_eos=True):
                    events.append(e)
            except GenerateError as e:
                failure.append(e)

        t = threading.Thread(target=long_stream)
        t.start()
        deadline = time.monotonic() + 120
        while len(events) < 3:
            assert time.monotonic() < deadline and t.is_alive(), "the stream did not start"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive(), "the open stream hung after its worker was killed"
        assert failure and "lost its engine worker" in failure[0].message, (events[-1:], failure)
        assert f"pid {pid}" in failure[0].message

        with pytest.raises(GenerateError) as e:
            generate(pooled.http_url, "doomed", "still there?", max_tokens=3)
        assert "lost its engine worker" in e.value.message and "load the model again" in e.value.message
        deadline = time.monotonic() + 30  # the metrics thread applies the count after the error is sent
        while metric(pooled, "tritonmoe_requests_total", model="doomed", outcome="unavailable") < 1:
            assert time.monotonic() < deadline, "the failed stream was not counted"
            time.sleep(0.2)

        # unload and load again: a fresh worker from the pool serves it
        client.unload_model("doomed")
        deadline = time.monotonic() + 60
        while client.is_model_ready("doomed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        pool.wait_warm()
        client.load_model("doomed")
        assert pool.worker_of("doomed") != pid
        assert generate(pooled.http_url, "doomed", "back", max_tokens=3)["num_output_tokens"] >= 1
        client.unload_model("doomed")
    finally:
        client.close()


def test_pool_with_the_loader_serves_the_same_tokens(pooled, tiny, reference, tmp_path):
    """The fast path: weights from a real loader service's DRAM cache into a warm worker."""
    from test_loader_service import Loader
    from tritonmoe.loader.convert import convert

    converted = convert(tiny("qwen3_moe"), tmp_path / "qwen3-converted", progress=False).dest
    shm = Path("/dev/shm") / f"tritonmoe-test-{uuid.uuid4().hex[:8]}"
    loader = Loader(tmp_path / "loader", shm).start()
    client = httpclient.InferenceServerClient(pooled.http_url, network_timeout=300)
    try:
        pooled.pool.wait_warm()
        write_model(pooled.repo, "pool_loader", converted, loader_url=loader.client.url,
                    engine_pool=pooled.pool.socket)
        client.load_model("pool_loader")
        _, text = reference(tiny("qwen3_moe"), PROMPTS[1], 10)
        assert generate(pooled.http_url, "pool_loader", PROMPTS[1], max_tokens=10,
                        exclude_input_in_output=True)["text_output"] == text
        log = pooled.log_path.read_text()
        assert "through the loader" in log and "(engine worker" in log  # the worker's log lines reach Triton's
        for phase in ("dram_fill", "index_read", "gpu_copy", "build", "tokenizer", "pool_claim"):
            assert metric(pooled, "tritonmoe_startup_seconds", model="pool_loader", phase=phase) > 0, phase
        pid = pooled.pool.worker_of("pool_loader")
        client.unload_model("pool_loader")
        assert _gone(pid)

        # --prepin-loader: warm workers map the loader's DRAM-resident models before a claim (and page-lock them
        # on a GPU); a load of one of them uses that mapping and serves the same tokens
        prepinned = Pool(tmp_path / "prepin-pool.log", 1, "--prepin-loader", loader.client.url).start()
        try:
            [warm] = [w["warm"] for w in prepinned.status()["workers"] if w["state"] == "warm"]
            assert warm["prepinned"]["models"] == 1 and warm["prepinned"]["bytes"] > 0 and "prepin" in warm["phases"]
            write_model(pooled.repo, "pool_prepinned", converted, loader_url=loader.client.url,
                        engine_pool=prepinned.socket)
            client.load_model("pool_prepinned")
            assert generate(pooled.http_url, "pool_prepinned", PROMPTS[1], max_tokens=10,
                            exclude_input_in_output=True)["text_output"] == text
            assert "using the mapping of" in pooled.log_path.read_text()
            client.unload_model("pool_prepinned")
        finally:
            prepinned.stop()
    finally:
        client.close()
        loader.stop()
        shutil.rmtree(shm, ignore_errors=True)


def test_workers_exit_when_their_server_dies(tiny, tmp_path):
    """SIGKILL to tritonserver and its stubs: each claimed worker sees its connection close and exits (freeing
    its device); the pool reaps it and stays at its warm count."""
    pool = Pool(tmp_path / "pool.log").start()
    repo = tmp_path / "repo"
    write_model(repo, "orphan", tiny("mixtral"), engine_pool=pool.socket)
    server = TritonServer(repo, models=["orphan"], log_path=tmp_path / "tritonserver.log")
    try:
        server.start(timeout=300)
        pid = pool.worker_of("orphan")
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        assert _gone(pid), f"worker {pid} outlived its server"
        pool.wait_warm()
    finally:
        server.stop()
        pool.stop()


def test_pool_reports_workers_that_cannot_warm_up(tmp_path):
    """A device the workers cannot use (a GPU on a machine without one): the pool keeps running, backs off, says
    why on --status, and a claim for it fails with the workers' own error instead of waiting forever."""
    from tritonmoe.backend.engine_pool import claim_worker

    folder = Path(tempfile.mkdtemp(prefix="tmoe-pool-test-"))
    socket_path = str(folder / "pool.sock")
    log = tmp_path / "pool.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tritonmoe.backend.engine_pool", "--socket", socket_path,
                                 "--devices", "cuda:0", "--no-kernel-warmup"], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if pool_status(socket_path)["last_error"].get("cuda:0"):
                    break
            except PoolError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        r = subprocess.run([sys.executable, "-m", "tritonmoe.backend.engine_pool", "--socket", socket_path,
                            "--status"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout)["warm"] == {"cuda:0": 0}
        with pytest.raises(PoolError, match=r"no warm worker for cuda:0 within 2s .*last failure: cuda:0: "):
            claim_worker(socket_path, "cuda:0", "m", timeout=2)
        with pytest.raises(PoolError, match="it keeps workers for cuda:0, not for cpu"):
            claim_worker(socket_path, "cpu", "m", timeout=2)
        assert "failed to warm up" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    assert not Path(socket_path).exists() and not Path(socket_path + ".key").exists()  # the pool cleaned up
    shutil.rmtree(folder, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "tritonmoe.backend.engine_pool", "--socket", socket_path, "--status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach the engine pool" in r.stderr


@pytest.mark.parametrize("delay", [0, 60])
def test_replacement_starts_at_once_or_after_replace_delay(tmp_path, delay):
    """--replace-delay keeps a claimed worker's replacement from warming up beside its load: with 0 it is starting
    right after the claim, with 60 none is started while the claimed worker loads."""
    pool = Pool(tmp_path / "pool.log", 1, "--replace-delay", str(delay)).start()
    try:
        conn, worker = claim_worker(pool.socket, "cpu", "m")
        try:
            time.sleep(1.0)  # several rounds of the pool's maintenance loop (every 0.2 s)
            others = [w for w in pool.status()["workers"] if w["pid"] != worker["pid"]]
            if delay:
                assert others == [], others
            else:
                assert [w["state"] for w in others] in (["starting"], ["warm"]), others
        finally:
            conn.close()
        assert _gone(worker["pid"])  # a claimed worker whose stub goes away exits
    finally:
        pool.stop()

