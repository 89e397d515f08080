"""The loader service as a real process over real files: API, tiers, budgets, one read per model, faults.

Every test starts `python -m tritonmoe.loader.service` on a free port with its DRAM cache in a fresh /dev/shm
folder; "remote" checkpoints are served by a loopback HTTP server (or read through fsspec's file://)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tritonmoe.loader.client import LoaderClient, LoaderError, ShmCheckpoint
from tritonmoe.loader.convert import convert
from tritonmoe.loader.format import INDEX_FILE, partition_file_name, read_index
from tritonmoe.loader.hf_model import load_hf_model_from_shm
from tritonmoe.tools.bench_loader import make_checkpoint
from tritonmoe.tools.tiny_models import TinySpec, build
from tritonmoe.tools.tritonserver import free_port


class Loader:
    """One loader service process; restartable on the same state (root and shared-memory folders)."""

    def __init__(self, root: Path, shm: Path, dram: str = "1GiB", disk: str = "1GiB", *extra: str,
                 token: str | None = None):
        self.root, self.shm, self.dram, self.disk, self.extra, self.token = root, shm, dram, disk, extra, token
        self.proc = None
        self.log = root.parent / f"{root.name}.log"

    def start(self, same_port: bool = False) -> "Loader":
        if not (same_port and getattr(self, "port", None)):
            self.port = free_port()
        cmd = [sys.executable, "-m", "tritonmoe.loader.service", "--root", str(self.root), "--dram-budget",
               self.dram, "--disk-budget", self.disk, "--port", str(self.port), "--shm-dir", str(self.shm),
               *self.extra]
        env = dict(os.environ)
        if self.token:
            env["TRITONMOE_LOADER_TOKEN"] = self.token
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env)
        self.client = LoaderClient(f"http://127.0.0.1:{self.port}", token=self.token or "")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                self.client.health()
                return self
            except LoaderError:
                time.sleep(0.05)
        raise AssertionError(f"loader did not come up:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def loaders(tmp_path):
    """loaders(dram=..., disk=..., *flags) -> a started Loader; all stopped and their shm removed afterwards."""
    started, shms = [], []

    def start(*extra: str, dram: str = "1GiB", disk: str = "1GiB", token: str | None = None) -> Loader:
        shm = Path("/dev/shm") / f"tritonmoe-test-{uuid.uuid4().hex[:8]}"
        shms.append(shm)
        loader = Loader(tmp_path / f"root{len(started)}", shm, dram, disk, *extra, token=token).start()
        started.append(loader)
        return loader

    yield start
    for loader in started:
        loader.stop()
    for shm in shms:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Converted checkpoints: a tiny Mixtral (HF folder too) and two random MoE-shaped ones (small < big)."""
    root = tmp_path_factory.mktemp("service-ckpts")
    hf = build(TinySpec(arch="mixtral", layers=2), root / "tiny-hf")
    out = {"tiny_hf": hf, "tiny": convert(hf, root / "tiny", progress=False).dest}
    for name, gib in (("small", 0.022), ("big", 0.09)):
        src = make_checkpoint(root / f"{name}-hf", gib, 2)
        out[name] = convert(src, root / name, progress=False).dest
    return out


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class Remote:
    """A loopback HTTP server over a folder; ``stall`` makes every GET wait without answering, ``delay`` sleeps
    between 256 KiB pieces of a body (a slow remote)."""

    def __init__(self, folder: Path, stall: bool = False, delay: float = 0.0):
        outer = self
        self.stall, self.delay, self.gets = stall, delay, 0
        self.release = threading.Event()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.gets += 1
                if outer.stall:
                    outer.release.wait(60)
                    return
                super().do_GET()

            def copyfile(self, source, outputfile):
                while piece := source.read(256 << 10):
                    outputfile.write(piece)
                    if outer.delay:
                        time.sleep(outer.delay)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- API ---------------------------------------------------------------------------------------------------------
def test_register_load_status_evict_unregister(loaders, ckpts, caplog):
    loader = loaders()
    c = loader.client
    assert c.health()["status"] == "ok"
    st = c.register("tiny", ckpts["tiny"])
    assert (st["tier"], st["bytes"]) == ("disk", read_index(ckpts["tiny"]).total_bytes)
    assert c.register("tiny", ckpts["tiny"])["name"] == "tiny"  # idempotent for the same source
    with pytest.raises(LoaderError, match="registered with source") as e:
        c.register("tiny", ckpts["small"])
    assert e.value.status == 409
    with ShmCheckpoint(c.load("tiny")["shm_path"]) as ck:
        st = c.status("tiny")
        assert st["tier"] == "dram" and st["in_dram"] and st["dram_fills"] == 1
        assert set(st["load_seconds"]) >= {"index_read", "dram_read", "verify", "total"}
        assert st["direct_io"] in (True, False)
        assert Path(st["shm_path"]) == loader.shm / "tiny" and (loader.shm / "tiny" / INDEX_FILE).is_file()
        # the DRAM copy is a complete converted folder (config, tokenizer) with the very same bytes
        assert (loader.shm / "tiny" / "config.json").read_bytes() == (ckpts["tiny"] / "config.json").read_bytes()
        ck.verify()
    log = loader.log.read_text()
    assert "filling DRAM cache" in log and ("O_DIRECT reads" in log or "buffered reads" in log)
    listing = c.status()
    assert listing["dram_bytes"] == st["bytes"] and [m["name"] for m in listing["models"]] == ["tiny"]
    st = c.evict("tiny")
    assert st["tier"] == "disk" and not (loader.shm / "tiny").exists()
    assert c.unregister("tiny") == {"unregistered": "tiny"}
    with pytest.raises(LoaderError) as e:
        c.status("tiny")
    assert e.value.status == 404


@pytest.mark.parametrize("name", ["..", "a..b", ".hidden", "-x", "x" * 129, "sp ace", "a%2Fb"])
def test_bad_names_and_sources_are_refused(loaders, ckpts, name):
    c = loaders().client
    with pytest.raises(LoaderError) as e:
        c.register(name, ckpts["tiny"])
    assert e.value.status == 400 and "invalid model name" in str(e.value)
    assert not any(Path(c.status()["shm_dir"]).iterdir())


def test_bad_sources_are_refused(loaders, ckpts, tmp_path):
    c = loaders().client
    for source, why in (("relative/path", "absolute"), (str(tmp_path / "missing"), "does not exist"),
                        (str(ckpts["tiny_hf"]), "not a converted tritonmoe checkpoint")):
        with pytest.raises(LoaderError, match=why):
            c._request("POST", "/v1/models", {"name": "m", "source": source})
    with pytest.raises(LoaderError) as e:
        c.load("never-registered")
    assert e.value.status == 404


def test_bearer_token(loaders, ckpts):
    loader = loaders(token="s3cret")
    assert loader.client.register("tiny", ckpts["tiny"])["tier"] == "disk"
    anonymous = LoaderClient(loader.client.url, token="")
    assert anonymous.health()["status"] == "ok"  # liveness needs no token
    for call in (lambda: anonymous.status(), lambda: anonymous.load("tiny"), lambda: anonymous.metrics()):
        with pytest.raises(LoaderError) as e:
            call()
        assert e.value.status == 401
    wrong = LoaderClient(loader.client.url, token="guess")
    with pytest.raises(LoaderError, match="bearer token"):
        wrong.load("tiny")
    assert loader.client.status("tiny")["tier"] == "disk"  # nothing was loaded by the refused calls


# ---- tiers and budgets -----------------------------------------------------------------------------------------
def test_remote_http_to_disk_to_dram_with_disk_lru(loaders, ckpts):
    server = Remote(ckpts["small"].parent)
    try:
        small_bytes = read_index(ckpts["small"]).total_bytes
        loader = loaders(disk=str(int(small_bytes * 1.5)))  # room for one fetched model
        c = loader.client
        c.register("a", f"{server.url}/small")
        c.register("b", f"file://{ckpts['small']}")  # fsspec's local protocol, handled as a remote
        assert c.status("a")["tier"] == "remote" and c.status("a")["bytes"] is None
        st = c.load("a")
        assert (st["tier"], st["remote_fetches"], st["dram_fills"]) == ("dram", 1, 1)
        assert "remote_fetch" in st["load_seconds"] and Path(st["disk_path"]) == loader.root / "disk" / "a"
        c.evict("a")
        assert c.status("a")["tier"] == "disk"  # the disk copy stays
        c.load("b")  # needs the disk cache: "a" is the least recently used fetched model
        assert c.status("a")["tier"] == "remote" and not (loader.root / "disk" / "a").exists()
        assert c.status("b")["tier"] == "dram" and c.status()["disk_cache_bytes"] == small_bytes
        st = c.evict("b", tier="disk")
        assert st["tier"] == "remote" and not (loader.root / "disk" / "b").exists()
        text = c.metrics()
        assert metric(text, "tritonmoe_loader_remote_fetches_total", model="a") == 1
        assert metric(text, "tritonmoe_loader_evictions_total", tier="disk") == 2
    finally:
        server.close()


def test_dram_lru_eviction(loaders, ckpts, tmp_path):
    size = read_index(ckpts["small"]).total_bytes
    loader = loaders(dram=str(int(size * 2.5)))  # two of three fit
    c = loader.client
    for name in ("m1", "m2", "m3"):
        c.register(name, copy_ckpt(ckpts["small"], tmp_path / name))
    c.load("m1")
    c.load("m2")
    c.load("m1")  # m1 is now more recently used than m2
    c.load("m3")
    tiers = {m["name"]: m["tier"] for m in c.status()["models"]}
    assert tiers == {"m1": "dram", "m2": "disk", "m3": "dram"}
    assert sorted(p.name for p in loader.shm.iterdir()) == ["m1", "m3"]
    assert c.status()["dram_bytes"] == 2 * size <= c.status()["dram_budget"]
    assert metric(c.metrics(), "tritonmoe_loader_evictions_total", tier="dram") == 1


def test_model_larger_than_dram_budget_is_a_clear_error(loaders, ckpts):
    size = read_index(ckpts["small"]).total_bytes
    c = loaders(dram=str(size // 2)).client
    c.register("small", ckpts["small"])
    with pytest.raises(LoaderError, match=r"needs \d+ bytes .* but the DRAM budget is") as e:
        c.load("small")
    assert e.value.status == 507
    st = c.status("small")
    assert st["tier"] == "disk" and "DRAM budget" in st["last_error"]
    assert not any(Path(c.status()["shm_dir"]).iterdir())  # nothing half-written
    assert c.health()["status"] == "ok"  # the service carries on


def test_concurrent_loads_read_once(loaders, ckpts):
    # a throttled remote (a few seconds for the model) keeps the load in flight while all 8 requests arrive
    server = Remote(ckpts["small"].parent, delay=0.002)
    try:
        loader = loaders()
        c = loader.client
        c.register("m", f"{server.url}/small")
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: c.load("m"), range(8)))
    finally:
        server.close()
    assert {s["tier"] for s in statuses} == {"dram"}
    st = c.status("m")
    assert st["dram_fills"] == 1 and st["remote_fetches"] == 1 and st["load_requests"] == 8
    text = c.metrics()
    assert metric(text, "tritonmoe_loader_dram_fills_total", model="m") == 1
    assert metric(text, "tritonmoe_loader_load_requests_total", model="m", outcome="loaded") == 1
    joined = metric(text, "tritonmoe_loader_load_requests_total", model="m", outcome="joined")
    hits = metric(text, "tritonmoe_loader_load_requests_total", model="m", outcome="hit")
    assert joined == 7 and hits == 0  # every other request waited on the one read in flight
    assert metric(text, "tritonmoe_loader_read_bytes_total") == read_index(ckpts["small"]).total_bytes


# ---- corrupt checkpoints -----------------------------------------------------------------------------------------
def test_bit_flip_names_the_tensor_and_nothing_is_served(loaders, ckpts, tmp_path):
    bad = copy_ckpt(ckpts["tiny"], tmp_path / "flipped")
    index = read_index(bad)
    name, entry = next((n, e) for n, e in index.tensors.items() if "experts.1.w2" in n)
    with open(bad / partition_file_name(entry.partition), "r+b") as f:
        f.seek(entry.offset + entry.bytes // 2)
        byte = f.read(1)
        f.seek(entry.offset + entry.bytes // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    c = loaders().client
    c.register("bad", bad)
    with pytest.raises(LoaderError, match=f"checksum mismatch for tensor '{name}'") as e:
        c.load("bad")
    assert e.value.status == 500
    assert c.status("bad")["tier"] == "disk"
    assert not any(Path(c.status()["shm_dir"]).iterdir())  # the half-filled staging folder is gone


def test_truncated_partition_and_mismatched_index(loaders, ckpts, tmp_path):
    c = loaders().client
    truncated = copy_ckpt(ckpts["tiny"], tmp_path / "truncated")
    c.register("truncated", truncated)  # registered while intact
    part = truncated / partition_file_name(0)
    os.truncate(part, part.stat().st_size - 4096)
    with pytest.raises(LoaderError, match="partition-00000.bin is .* bytes but the index records .*truncated"):
        c.load("truncated")
    mismatched = copy_ckpt(ckpts["tiny"], tmp_path / "mismatched")
    c.register("mismatched", mismatched)
    doc = json.loads((mismatched / INDEX_FILE).read_text())
    a, b = [n for n in doc["tensors"] if n.endswith("experts.0.w1.weight")][:2]  # same shape, other bytes
    assert doc["tensors"][a]["checksum"] != doc["tensors"][b]["checksum"]
    doc["tensors"][a]["checksum"], doc["tensors"][b]["checksum"] = (doc["tensors"][b]["checksum"],
                                                                    doc["tensors"][a]["checksum"])
    (mismatched / INDEX_FILE).write_text(json.dumps(doc))
    with pytest.raises(LoaderError, match=f"checksum mismatch for tensor '({a}|{b})'"):
        c.load("mismatched")
    assert {m["tier"] for m in c.status()["models"]} == {"disk"}
    assert not any(Path(c.status()["shm_dir"]).iterdir())


# ---- a loader that dies, a remote that stalls -------------------------------------------------------------------
def test_loader_killed_mid_load_then_retry_after_restart(loaders, ckpts):
    server = Remote(ckpts["big"].parent, delay=0.01)  # ~40 s for the whole model: plenty of time to kill it
    try:
        loader = loaders()
        c = loader.client
        c.register("big", f"{server.url}/big")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.load, "big")
            deadline = time.monotonic() + 20
            while not list((loader.root / "disk").glob(".big.fetching-*/*")):
                assert time.monotonic() < deadline and not pending.done()
                time.sleep(0.02)
            assert c.status("big")["tier"] == "loading"
            loader.kill()
            with pytest.raises(LoaderError, match="went away.*retry once the loader is running again"):
                pending.result(timeout=30)
        assert list((loader.root / "disk").glob(".big.fetching-*"))  # the interrupted fetch is left behind
        server.delay = 0
        loader.start()  # same root and shm: the registration survives, leftovers are cleaned up
        assert not list((loader.root / "disk").glob(".big.fetching-*"))
        assert c is not loader.client
        st = loader.client.status("big")
        assert st["tier"] == "remote"
        with loader.client.ensure_loaded("big") as ck:
            ck.verify()
        assert loader.client.status("big")["dram_fills"] == 1
        loader.stop()
        loader.start()  # a clean restart finds the fetched copy on disk and counts it against the disk budget
        st = loader.client.status("big")
        assert (st["tier"], st["bytes"]) == ("dram", read_index(ckpts["big"]).total_bytes)
        assert loader.client.status()["disk_cache_bytes"] == st["bytes"]
    finally:
        server.close()


def test_restart_adopts_complete_dram_copies_and_drops_partial_ones(loaders, ckpts):
    loader = loaders()
    loader.client.register("tiny", ckpts["tiny"])
    loader.client.load("tiny")
    loader.kill()
    partial = loader.shm / ".other.loading-1-deadbeef"
    partial.mkdir()
    (partial / "partition-00000.bin").write_bytes(b"\0" * 4096)
    loader.start()
    st = loader.client.status("tiny")
    assert st["tier"] == "dram" and st["dram_fills"] == 0  # adopted, not re-read
    assert not partial.exists()
    with loader.client.ensure_loaded("tiny") as ck:
        ck.verify()
    assert loader.client.status("tiny")["dram_fills"] == 0


def test_remote_that_stalls_times_out(loaders, ckpts):
    server = Remote(ckpts["tiny"].parent, stall=True)
    try:
        c = loaders("--remote-timeout", "1").client
        c.register("stalled", f"{server.url}/tiny")
        start = time.monotonic()
        with pytest.raises(LoaderError, match="timed out") as e:
            c.load("stalled")
        assert time.monotonic() - start < 15
        assert e.value.status == 504 and server.gets >= 1
        assert c.status("stalled")["tier"] == "remote"
        assert not list(Path(c.status()["shm_dir"]).iterdir())
    finally:
        server.close()


def test_unreachable_loader_is_a_clear_error():
    c = LoaderClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(LoaderError, match="cannot reach the loader .* start it with"):
        c.ensure_loaded("anything")


# ---- models through the loader ---------------------------------------------------------------------------------
def test_greedy_tokens_through_the_loader_equal_transformers(loaders, ckpts, reference):
    c = loaders().client
    c.register("tiny", ckpts["tiny"])
    prompt = "def hello(world):\n    return"
    want, _ = reference(ckpts["tiny_hf"], prompt, 12)
    from transformers import AutoTokenizer

    with c.ensure_loaded("tiny") as ck:
        tok = AutoTokenizer.from_pretrained(ck.path)  # tokenizer files travel with the DRAM copy
        ids = tok(prompt, return_tensors="pt").input_ids
        for experts_device in (None, "cpu"):
            model = load_hf_model_from_shm(ck, "cpu", torch.float32, experts_device=experts_device).eval()
            got = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
            assert got == want
        # float32 on the CPU keeps the checkpoint's dtype: non-expert weights are views of the shared memory
        norm = model.model.norm.weight
        assert norm.untyped_storage().data_ptr() == ck.tensor("model.norm.weight").untyped_storage().data_ptr()


def test_shm_checkpoint_views_and_expert_ranges(loaders, ckpts):
    c = loaders().client
    c.register("tiny", ckpts["tiny"])
    with c.ensure_loaded("tiny") as ck:
        index = ck.index
        sd = ck.state_dict()
        from tritonmoe.loader.reader import load_state_dict

        ref = load_state_dict(ckpts["tiny"])
        assert set(sd) == set(ref) and all(torch.equal(sd[n], ref[n]) for n in ref)
        e = index.experts[3]
        raw = ck.expert_bytes(e.layer, e.expert, e.module)
        assert raw.numel() == e.bytes and raw.is_contiguous()
        for name in e.tensors:
            t = index.tensors[name]
            assert raw[t.offset - e.offset:t.offset - e.offset + t.bytes].view(ref[name].dtype).reshape(
                ref[name].shape).equal(ref[name])
        # a write through the mapping stays private: the cache other processes map is untouched
        sd["model.norm.weight"].add_(1)
        with ShmCheckpoint(ck.path) as other:
            assert torch.equal(other.tensor("model.norm.weight"), ref["model.norm.weight"])
        spans = ck.spans(ck.non_expert_names())
        assert all(s % 4096 == 0 for _, s, _ in spans) and len(spans) <= len(index.partitions)


# ---- the backend through the loader (backend/weights.py, config parameter loader_url) ---------------------------
def test_backend_load_for_serving_through_the_loader(loaders, ckpts, reference):
    from transformers import AutoTokenizer

    from tritonmoe.backend.checkpoint import CheckpointError as BackendCheckpointError
    from tritonmoe.backend.config import EngineConfig
    from tritonmoe.backend.weights import load_for_serving

    loader = loaders()
    prompt = "import os\nimport"
    want, _ = reference(ckpts["tiny_hf"], prompt, 10)
    by_path = EngineConfig.from_parameters({"checkpoint": str(ckpts["tiny"]), "loader_url": loader.client.url})
    loaded = load_for_serving(by_path, torch.device("cpu"))
    assert loaded.layout == "tritonmoe-loader" and loaded.offloader is None
    assert set(loaded.phases) >= {"dram_fill", "index_read", "gpu_copy", "build", "tokenizer"}
    ids = AutoTokenizer.from_pretrained(ckpts["tiny"])(prompt, return_tensors="pt").input_ids
    got = loaded.model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got == want
    [registered] = loader.client.status()["models"]  # registered under folder name + path hash
    assert registered["name"].startswith("tiny-") and registered["source"] == str(ckpts["tiny"].resolve())
    # the checkpoint parameter may name a model registered at the loader; a second backend reads nothing again
    by_name = EngineConfig.from_parameters({"checkpoint": registered["name"], "loader_url": loader.client.url,
                                            "expert_cache_budget": "50%"})
    offloaded = load_for_serving(by_name, torch.device("cpu"))
    assert offloaded.offloader is not None and "offload_setup" in offloaded.phases
    assert offloaded.offloader.stats()["host_bytes"] > 0

    def announce(module, args, kwargs):  # what the serving engine does before each forward
        rows = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        offloaded.offloader.begin_forward(["r"], "prefill" if rows.shape[1] > 1 else "decode")

    offloaded.model.register_forward_pre_hook(announce, with_kwargs=True)
    with torch.no_grad():
        got = offloaded.model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got == want
    assert loader.client.status(registered["name"])["dram_fills"] == 1
    missing = EngineConfig.from_parameters({"checkpoint": "not-registered", "loader_url": loader.client.url})
    with pytest.raises(BackendCheckpointError, match="'not-registered' is not registered"):
        load_for_serving(missing, torch.device("cpu"))
    down = EngineConfig.from_parameters({"checkpoint": str(ckpts["tiny"]),
                                         "loader_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(BackendCheckpointError, match="cannot reach the loader"):
        load_for_serving(down, torch.device("cpu"))


def test_gpu_copy_needs_a_gpu_and_the_flag(loaders, ckpts, tmp_path):
    # without --gpu-copy the copy route is refused clearly and status says so
    c = loaders().client
    c.register("tiny", ckpts["tiny"])
    assert c.load("tiny")["gpu_copy"] is False
    with pytest.raises(LoaderError, match="start it with --gpu-copy") as e:
        c._request("POST", "/v1/models/tiny/copy", {"targets": []})
    assert e.value.status == 501
    if torch.cuda.is_available():
        return
    # on a machine without a GPU, asking for GPU copies is a clear start-up error, not a traceback
    r = subprocess.run([sys.executable, "-m", "tritonmoe.loader.service", "--root", str(tmp_path / "r"),
                        "--dram-budget", "1GiB", "--disk-budget", "1GiB", "--port", str(free_port()), "--shm-dir",
                        str(tmp_path / "shm"), "--gpu-copy"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--gpu-copy needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
