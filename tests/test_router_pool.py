"""The router's cold starts through a warm engine pool, with real processes: a real tritonserver, a real pool
(``python -m tritonmoe.backend.engine_pool``, CPU workers) and the router in-process. The host's ``engine_pool``
(hosts file) reaches the config of every model the router loads there: a request for a model nothing has loaded
claims a warm worker (the pool's status says so) and the server's stub never imports torch; greedy tokens equal
transformers' generate(); after the keep-alive the router unloads it, the worker exits and the pool is back to its
warm count. A model with ``use_engine_pool: false`` loads in its own stub on the same host, and a deploy request
cannot name a pool socket of its own."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import PROMPTS
from test_engine_pool import Pool, _gone
from test_router import server_models, start_servers, wait_for
from tritonmoe.router.config import ConfigError, RouterConfig
from tritonmoe.router.harness import HTTPError, RouterThread, call, stream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pooled_router(tmp_path_factory, tiny):
    """One real pool (1 warm CPU worker), one real tritonserver whose host entry names the pool, the router."""
    tmp = tmp_path_factory.mktemp("router-pool")
    pool = Pool(tmp / "pool.log").start()
    servers = []
    router = None
    try:
        servers = start_servers(1, tmp)
        [s] = servers
        cfg = RouterConfig.parse({
            "hosts": [{"name": "h0", "http": s.http_url, "grpc": s.grpc_url, "metrics": s.metrics_url,
                       "engine_pool": pool.socket}],
            "listen": {"port": 0}, "poll_interval_s": 0.5,
            "models": {"cold": {"checkpoint": str(tiny("mixtral")), "keep_alive_s": 3},
                       "own_stub": {"checkpoint": str(tiny("qwen3_moe")), "keep_alive_s": 600,
                                    "use_engine_pool": False}}})
        router = RouterThread(cfg).start()
        router.pool, router.server = pool, s
        yield router
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()
        pool.stop()


def model_parameters(server, model: str) -> dict:
    """The parameters of the config Triton loaded ``model`` with."""
    config = call(f"http://{server.http_url}/v2/models/{model}/config")
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def unloaded_by_triton(server, model: str, times: int, timeout: float = 30) -> bool:
    """Whether Triton's log says it finished unloading ``model`` ``times`` times (its stub was finalized)."""
    deadline = time.monotonic() + timeout
    while server.log_path.read_text().count(f"successfully unloaded '{model}'") < times:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_warm_count(pool, n: int = 1, timeout: float = 180) -> None:
    wait_for(lambda: pool.status()["warm"]["cpu"] == n, timeout, f"the pool's warm count {n}")


class ViewSampler:
    """Records the router's view of the host's pool (warm workers on its device, its own unclaimed cold starts
    there) every 50 ms, from the router's thread-shared objects."""

    def __init__(self, router):
        self.router, self.samples, self.stop = router, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> bool:
        host = self.router.router.hosts[0]
        view = host.pool
        try:
            self.samples.append((None if view.warm is None else view.warm_on(host.pool_device),
                                 self.router.router.manager.pool_pending(view, host.pool_device)))
            return True
        except RuntimeError:  # the router's loop changed a dict while this thread read it: next time
            return False

    def _run(self):
        while not self.stop.is_set():
            self._sample()
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        # the view the caller waited for may have come after the thread's last sample (it sleeps 50 ms between
        # samples): one more, so the samples end with the state the caller saw
        while not self._sample():
            time.sleep(0.01)


def router_pool_view(router) -> dict:
    [h] = call(router.url + "/admin/hosts")["hosts"]
    return h["engine_pool_view"]


def test_cold_start_goes_through_the_pool_and_scales_to_zero(pooled_router, tiny, reference):
    router, pool, server = pooled_router, pooled_router.pool, pooled_router.server
    assert "cold" not in server_models(server)
    hosts = call(router.url + "/admin/hosts")["hosts"]
    assert [h["engine_pool"] for h in hosts] == [pool.socket]
    # the router's poller follows the pool's warm count for the host's device
    wait_for(lambda: router_pool_view(router)["warm"] == 1, 30, "the router to see the pool's warm worker")
    view = router_pool_view(router)
    assert view["device"] == "cpu" and view["reachable"] and view["router_pending"] == 0 and view["error"] is None
    assert 0 < view["warmup_s"] < 60  # the warm-up its worker reported, not the prior

    # the first request cold-starts the model: the router's load carries the host's engine_pool
    ids, text = reference(tiny("mixtral"), PROMPTS[0], 12)
    sampler = ViewSampler(router).__enter__()
    r = call(router.url + "/v2/models/cold/generate", {"text_input": PROMPTS[0], "exclude_input_in_output": True,
                                                       "parameters": {"max_tokens": 12}})
    assert [c["model"] for c in router.router.manager.cold_starts] == ["cold"]
    assert model_parameters(server, "cold")["engine_pool"] == pool.socket
    pid = pool.worker_of("cold")  # the pool's status: one worker claimed for 'cold'
    log = server.log_path.read_text()
    assert f"in engine worker pid {pid} of the pool {pool.socket}" in log
    assert "this stub imported torch: no" in log

    # streaming through the same warm instance: same tokens, no second load
    ids1, text1 = reference(tiny("mixtral"), PROMPTS[1], 12)
    events = list(stream(router.url + "/v2/models/cold/generate_stream",
                         {"text_input": PROMPTS[1], "stream": True, "parameters": {"max_tokens": 12}}))
    assert [t for e in events for t in e["output_token_ids"]] == ids1
    assert "".join(e["text_output"] for e in events) == text1
    assert len(router.router.manager.cold_starts) == 1 and pool.worker_of("cold") == pid

    # the claim as the router saw it: the cold start counted against the warm worker until the pool's status
    # showed the worker claimed; then the warm count dropped (the replacement is still warming up)...
    wait_for(lambda: router_pool_view(router)["claimed"] == 1, 30, "the router to see the claimed worker")
    sampler.__exit__()
    assert sampler.samples[0] == (1, 0)
    assert (1, 1) in sampler.samples, sampler.samples
    assert any(w == 0 for w, _ in sampler.samples), sampler.samples
    assert router.router.manager.cold_starts[0]["pool_wait_s"] == 0  # it was expected to find the warm worker
    assert router_pool_view(router)["router_pending"] == 0  # the pool shows its claim: no longer pending
    # ...and comes back when the pool's replacement is warm
    wait_for(lambda: router_pool_view(router)["warm"] == 1, 120, "the router to see the replacement warm")

    # keep-alive (3 s) expires: the router unloads it, the worker exits, the pool is back to its warm count
    wait_for(lambda: "cold" not in router.router.hosts[0].instances, 60, "the keep-alive unload")
    wait_for(lambda: "cold" not in server_models(server), 60, "the server to unload 'cold'")
    # Triton finishes the unload (its stub finalized); the router once left it hanging now and then by cancelling
    # gRPC calls after their final response (router/upstream.py)
    assert unloaded_by_triton(server, "cold", 1), "Triton never finished unloading 'cold'"
    assert _gone(pid), f"worker {pid} still running after the scale-to-zero unload"
    status = pool.wait_warm()
    assert status["warm"]["cpu"] == 1 and pid not in [w["pid"] for w in status["workers"]]

    # scaled to zero, the next request cold-starts again through a fresh warm worker
    r = call(router.url + "/v2/models/cold/generate", {"text_input": PROMPTS[0], "exclude_input_in_output": True,
                                                       "parameters": {"max_tokens": 12}})
    assert r["output_token_ids"] == ids
    assert len(router.router.manager.cold_starts) == 2
    pid2 = pool.worker_of("cold")
    assert pid2 != pid
    wait_for(lambda: "cold" not in router.router.hosts[0].instances, 60, "the second keep-alive unload")
    assert unloaded_by_triton(server, "cold", 2), "Triton never finished the second unload of 'cold'"
    assert _gone(pid2)
    pool.wait_warm()


def test_a_model_can_opt_out_and_deploys_cannot_name_a_pool(pooled_router, tiny, reference):
    router, pool, server = pooled_router, pooled_router.pool, pooled_router.server
    wait_warm_count(pool)
    _, text = reference(tiny("qwen3_moe"), PROMPTS[2], 8)
    r = call(router.url + "/v2/models/own_stub/generate", {"text_input": PROMPTS[2], "exclude_input_in_output": True,
                                                           "parameters": {"max_tokens": 8}})
    assert r["text_output"] == text
    # loaded in its own stub: no worker claimed for it, and its config has no engine_pool
    assert all(w["model"] != "own_stub" for w in pool.status()["workers"])
    assert pool.status()["warm"]["cpu"] == 1  # nothing was claimed
    assert "engine_pool" not in model_parameters(server, "own_stub")
    call(router.url + "/admin/models/own_stub", method="DELETE")
    wait_for(lambda: "own_stub" not in server_models(server), 60, "the server to unload 'own_stub'")

    # a model's own parameters.engine_pool is refused: the host's pool is the operator's to set (file or API)
    with pytest.raises(HTTPError) as e:
        call(router.url + "/admin/models", {"name": "sneaky", "checkpoint": str(tiny("mixtral")),
                                            "parameters": {"engine_pool": "/tmp/elsewhere.sock"}})
    assert e.value.status == 400 and "set per host" in e.value.message
    with pytest.raises(ConfigError, match="must be the absolute path of the host's engine pool socket"):
        RouterConfig.parse({"hosts": [{"http": "127.0.0.1:1", "grpc": "127.0.0.1:2", "engine_pool": "pool.sock"}]})
