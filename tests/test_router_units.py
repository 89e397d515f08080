"""The router's pieces without servers: hosts-file validation, placement policies, the start-up estimate and its
updates from observed loads, the stream merge that makes failover and migration seamless, and the CLI."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from tritonmoe.router.config import ConfigError, ModelSpec, RouterConfig, load_config
from tritonmoe.router.lifecycle import Manager
from tritonmoe.router.migration import StreamSession, _Upstream
from tritonmoe.router.placement import Candidate, LocalityPolicy, RandomPolicy, RoundRobinPolicy
from tritonmoe.router.state import Host, Instance, parse_running
from tritonmoe.router.upstream import Chunk

HOSTS = [{"name": f"h{i}", "http": f"127.0.0.1:{8000 + 10 * i}", "grpc": f"127.0.0.1:{8001 + 10 * i}"}
         for i in range(3)]


def test_config_json_and_toml(tmp_path):
    doc = {"hosts": HOSTS, "policy": "random", "models": {"m": {"checkpoint": "/ckpt", "max_instances": 2}},
           "token_file": "tok"}
    (tmp_path / "tok").write_text("abc\n")
    (tmp_path / "hosts.json").write_text(json.dumps(doc))
    cfg = load_config(tmp_path / "hosts.json")
    assert cfg.policy == "random" and cfg.token == "abc" and cfg.models["m"].max_instances == 2
    assert cfg.listen_host == "127.0.0.1"  # loopback unless told otherwise
    (tmp_path / "hosts.toml").write_text('policy = "round_robin"\n[[hosts]]\nname = "a"\nhttp = "127.0.0.1:1"\n'
                                         'grpc = "127.0.0.1:2"\n[models.x]\ncheckpoint = "/c"\n')
    cfg = load_config(tmp_path / "hosts.toml")
    assert cfg.policy == "round_robin" and cfg.hosts[0].name == "a" and "x" in cfg.models


@pytest.mark.parametrize("doc, fragment", [
    ({}, "'hosts' must be a non-empty list"),
    ({"hosts": [{"http": "x", "grpc": "127.0.0.1:1"}]}, "hosts[0].http"),
    ({"hosts": HOSTS + HOSTS[:1]}, "unique"),
    ({"hosts": HOSTS, "policy": "fastest"}, "'policy' must be one of"),
    ({"hosts": HOSTS, "models": {"../x": {"checkpoint": "/c"}}}, "invalid model name"),
    ({"hosts": HOSTS, "models": {"m": {"checkpoint": "rel/path"}}}, "absolute path"),
    ({"hosts": HOSTS, "models": {"m": {"checkpoint": "/a/../../etc"}}}, "'..'"),
    ({"hosts": HOSTS, "models": {"m": {"checkpoint": "/c", "parameters": {"checkpoint": "/other"}}}}, "not allowed"),
    ({"hosts": HOSTS, "models": {"m": {"checkpoint": "/c", "min_instances": 3, "max_instances": 1}}}, "min_instances"),
    ({"hosts": HOSTS, "models": {"m": {"checkpoint": "/c", "keep_alive": 3}}}, "unknown key"),
    ({"hosts": HOSTS, "token_timeout_s": 0}, "'token_timeout_s' must be a number > 0"),
])
def test_config_errors_name_the_field(doc, fragment):
    with pytest.raises(ConfigError) as e:
        RouterConfig.parse(doc)
    assert fragment in str(e.value)


def _cands(*specs):
    out = []
    for name, tier, load_s, queue_s, inflight in specs:
        out.append(Candidate(Host(RouterConfig.parse({"hosts": [{**HOSTS[0], "name": name}]}).hosts[0]), tier,
                             load_s, queue_s, inflight))
    return out


def test_locality_prefers_loaded_then_fastest_tier():
    spec = ModelSpec("m", "/c", target_concurrency=2, max_instances=2)
    pol = LocalityPolicy()
    cands = _cands(("a", "disk", 8.0, 0, 0), ("b", "gpu", 0.0, 0, 1), ("c", "dram", 2.0, 0, 0))
    assert pol.choose(spec, cands, 1).host.name == "b"
    # the loaded instance is at its target concurrency: a DRAM cold start (2 s) beats queueing (5 s)
    cands = _cands(("a", "disk", 8.0, 0, 0), ("b", "gpu", 0.0, 5.0, 2), ("c", "dram", 2.0, 0, 0))
    assert pol.choose(spec, cands, 1).host.name == "c"
    # ...but not beyond max_instances
    assert pol.choose(spec, cands, 2).host.name == "b"
    # nothing loaded: the fastest tier, and a load in progress is joined rather than duplicated
    assert pol.choose(spec, _cands(("a", "disk", 8.0, 0, 0), ("c", "dram", 2.0, 0.5, 0)), 0).host.name == "c"
    assert pol.choose(spec, _cands(("a", "loading", 6.0, 0, 1), ("c", "dram", 2.0, 0, 0)), 1).host.name == "a"


def test_baselines_ignore_locality():
    spec = ModelSpec("m", "/c")
    cands = _cands(("a", "gpu", 0, 0, 0), ("b", "disk", 8, 0, 0), ("c", "disk", 8, 0, 0))
    rr = RoundRobinPolicy()
    assert [rr.choose(spec, cands, 1).host.name for _ in range(4)] == ["a", "b", "c", "a"]
    picks = {RandomPolicy(seed).choose(spec, cands, 1).host.name for seed in range(20)}
    assert picks == {"a", "b", "c"}


def test_startup_estimate_learns_from_observed_loads():
    h = Host(RouterConfig.parse({"hosts": HOSTS}).hosts[0])
    assert h.estimate_load_s("gpu", 10**9) == 0
    before = h.estimate_load_s("disk", 10**6)
    for _ in range(6):
        h.observe_load("disk", 10**6, 9.0)  # small checkpoints: the fixed cost is what is learned
    assert abs(h.estimate_load_s("disk", 10**6) - 9.0) < 0.3 and before != h.estimate_load_s("disk", 10**6)
    for _ in range(8):
        h.observe_load("disk", 40 * 10**9, h.overhead_s + 20.0)  # 40 GB in 20 s beyond the fixed cost: 2 GB/s
    assert 1.8e9 < h.bandwidth["disk"] < 2.2e9
    assert h.estimate_load_s("dram", 40 * 10**9) < h.estimate_load_s("disk", 40 * 10**9)


def test_parse_running_sequences():
    text = ('# TYPE tritonmoe_running_sequences gauge\ntritonmoe_running_sequences{model="a",version="1"} 3\n'
            'tritonmoe_running_sequences{model="b",version="1"} 0\nnv_inference_count{model="a"} 9\n')
    assert parse_running(text) == {"a": 3.0, "b": 0.0}


def _session():
    cfg = RouterConfig.parse({"hosts": HOSTS, "models": {"m": {"checkpoint": "/c"}}})
    hosts = [Host(h) for h in cfg.hosts]
    return StreamSession(Manager(cfg, hosts, LocalityPolicy()), "m", "p", {"temperature": 0.7}), hosts


def test_merge_forwards_each_position_once_and_checks_overlap():
    s, hosts = _session()
    assert isinstance(s.sampling["seed"], int)  # sampled without a seed: the router seeds it
    src = _Upstream(1, Instance("m", hosts[0]), 0, 0)
    s.upstreams[1] = src
    d = s._merge(src, Chunk([5, 6], "ab", "", 3, 2, False))
    assert (d.token_ids, d.text) == ([5, 6], "ab")
    dst = _Upstream(2, Instance("m", hosts[1]), 1, 1, tokens_end=1, chars_end=1)  # resumed from token 1
    s.upstreams[2] = dst
    assert s._merge(dst, Chunk([6], "b", "", 3, 2, False)) is None  # already sent: checked, not repeated
    d = s._merge(dst, Chunk([7, 8], "cd", "", 3, 4, False))
    assert (d.token_ids, d.text, d.num_output_tokens) == ([7, 8], "cd", 4)
    d = s._merge(src, Chunk([7], "c", "", 3, 3, False))  # the source is now behind: nothing new
    assert d is None and s.tokens == [5, 6, 7, 8] and s.chars == 4
    d = s._merge(dst, Chunk([9], "e", "length", 3, 5, True))
    assert d.finish_reason == "length" and s.tokens == [5, 6, 7, 8, 9]
    # a diverging upstream is dropped, not merged
    bad = _Upstream(3, Instance("m", hosts[2]), 0, 0)
    s.upstreams[3] = bad
    assert s._merge(bad, Chunk([5, 99], "ax", "", 3, 2, False)) is None and 3 not in s.upstreams


def test_a_streams_remaining_time_is_its_tokens_left_at_its_own_rate():
    s, hosts = _session()
    s.sampling["max_tokens"] = 31
    assert s.remaining_s() is None  # no token yet
    src = _Upstream(1, Instance("m", hosts[0]), 0, 0)
    s.upstreams[1] = src
    s._merge(src, Chunk([5], "a", "", 3, 1, False))
    assert s.first_token_at is not None and s.remaining_s() is None  # one token: no rate yet
    s.tokens = list(range(11))
    s.first_token_at = time.monotonic() - 1.0  # 10 tokens after the first in 1 s: 20 left take ~2 s
    assert s.remaining_s() == pytest.approx(2.0, rel=0.05)
    s.tokens = list(range(31))
    assert s.remaining_s() == 0.0  # at max_tokens
    s.done = True
    assert s.remaining_s() == 0.0


class _Running:
    """What placement sees of a running request: the instance it runs on and its tokens."""

    def __init__(self, inst, tokens, prompt_tokens=8, remaining=None):
        self.inst, self.tokens, self.num_input_tokens, self.id = inst, list(range(tokens)), prompt_tokens, "r"
        self.remaining = remaining

    def remaining_s(self):
        return self.remaining

    def source_instance(self):
        return self.inst

    def migratable(self):
        return bool(self.tokens)


def _blocked_best_host(slow_disk_bps: float, busy_min_instances: int = 0):
    """h0 (1 model) runs a stream of 'busy'; h1 (room for 2) has 'busy' idle; 'new' (1 GB) must start."""
    hosts = [{**HOSTS[0], "max_models": 1}, {**HOSTS[1], "max_models": 2, "bandwidth": {"disk": slow_disk_bps}}]
    cfg = RouterConfig.parse({"hosts": hosts, "placement_migration": True, "models": {
        "new": {"checkpoint": "/new"},
        "busy": {"checkpoint": "/busy", "max_instances": 2, "min_instances": busy_min_instances}}})
    m = Manager(cfg, [Host(h) for h in cfg.hosts], LocalityPolicy())
    m._bytes.update(new=10**9, busy=10**9)
    for h in m.hosts:
        h.instances["busy"] = Instance("busy", h, state="ready")
    m.hosts[0].instances["busy"].inflight = 1
    m.sessions = {"r": _Running(m.hosts[0].instances["busy"], 100)}
    spec = m.specs["new"]
    cands = m.candidates(spec)
    assert [c.host.name for c in cands] == ["h1"]  # h0 is full of a busy model: not an ordinary candidate
    return m, spec, m.policy.choose(spec, cands, 0)


def test_placement_migration_is_chosen_when_cheaper_than_starting_elsewhere():
    # h1 reads 'new' at 50 MB/s (25 s): migrating the stream to h1's idle 'busy' (recompute of 108 tokens) and
    # loading on h0 at the default disk bandwidth (1 GB/s: 6 s) is cheaper
    m, spec, choice = _blocked_best_host(5e7)
    plan = m._plan_migration(spec, set(), choice)
    assert plan.host.name == "h0" and [mv.dest.host.name for mv in plan.moves] == ["h1"]
    assert plan.moves[0].dest.tier == "gpu" and plan.moves[0].tokens == 108
    assert plan.migration_s == pytest.approx(m.hosts[1].estimate_recompute_s(108))
    assert plan.total_s == pytest.approx(plan.migration_s + m.hosts[0].estimate_load_s("disk", 10**9))
    assert m._decide(spec, plan, choice) == "migrate"
    assert m.placement_log[-1]["decision"] == "migrate" and m.placement_log[-1]["alternative_host"] == "h1"


def test_placement_migration_is_declined_when_starting_elsewhere_is_cheaper():
    # h1's disk is only a little slower than h0's: the 0.2 s of moving the stream does not pay
    m, spec, choice = _blocked_best_host(0.99e9)
    plan = m._plan_migration(spec, set(), choice)
    assert plan is not None and plan.load_s < choice.startup_s < plan.total_s
    assert m._decide(spec, plan, choice) == "start_elsewhere" and m.placement_log[-1]["decision"] == "start_elsewhere"
    # no better locality at all: no plan
    m, spec, choice = _blocked_best_host(2e9)
    assert m._plan_migration(spec, set(), choice) is None
    # a stream that cannot move (no tokens yet), or a move below min_instances, blocks the plan
    m, spec, choice = _blocked_best_host(5e7)
    m.sessions["r"].tokens = []
    assert m._plan_migration(spec, set(), choice) is None
    m, spec, choice = _blocked_best_host(5e7, busy_min_instances=2)
    assert m._plan_migration(spec, set(), choice) is None


def test_placement_waits_for_streams_about_to_end_when_that_is_soonest():
    """ServerlessLLM's third option: when the best host's streams will end sooner than moving them (and sooner
    than a cold start on a free host), wait for them; a stream far from its end is migrated; one whose end cannot
    be estimated is not waited for."""
    m, spec, choice = _blocked_best_host(5e7)  # h1 reads 'new' in 20 s; h0 in 1 s once it has room
    m.sessions["r"].remaining = 0.05
    plan = m._plan_migration(spec, set(), choice)
    assert plan.wait_s == pytest.approx(0.05) and plan.wait_total_s == pytest.approx(0.05 + plan.load_s)
    assert plan.wait_total_s < plan.total_s < choice.startup_s
    assert m._decide(spec, plan, choice) == "wait"
    entry = m.placement_log[-1]
    assert entry["decision"] == "wait" and entry["wait_s"] == pytest.approx(0.05)
    assert m._decide(spec, plan, choice, quiet_wait=True) == "wait" and len(m.placement_log) == 1  # not again
    m.sessions["r"].remaining = 30.0  # far from its end: moving it is sooner
    plan = m._plan_migration(spec, set(), choice)
    assert m._decide(spec, plan, choice) == "migrate"
    m.sessions["r"].remaining = None  # fewer than two tokens so far: no estimate, no waiting
    assert m._plan_migration(spec, set(), choice).wait_s is None
    # a stream that cannot move can still be waited for, when that beats the free host...
    m, spec, choice = _blocked_best_host(5e7)
    m.sessions["r"].tokens, m.sessions["r"].remaining = [], 0.5
    plan = m._plan_migration(spec, set(), choice)
    assert plan.moves == [] and plan.total_s == float("inf") and m._decide(spec, plan, choice) == "wait"
    m.sessions["r"].remaining = 100.0  # ... and not when it does not
    assert m._decide(spec, m._plan_migration(spec, set(), choice), choice) == "start_elsewhere"
    # an instance the model's min_instances keeps loaded is never freed by waiting
    m, spec, choice = _blocked_best_host(5e7, busy_min_instances=2)
    m.sessions["r"].remaining = 0.05
    assert m._plan_migration(spec, set(), choice) is None


def test_acquire_waits_for_the_best_hosts_stream_to_end_then_loads_there():
    """The acquire loop re-plans while it waits: once the stream on h0 ends (its instance goes idle and can be
    evicted), the model starts on h0 from its fast tier, not on h1 with the slow disk; the wait is logged once."""
    m, spec, choice = _blocked_best_host(5e7)
    m.sessions["r"].remaining = 0.01  # (a stand-in: its estimate does not shrink, so the router waits until it ends)
    assert m._plan_migration(spec, set(), choice).migration_s > 0.01  # waiting beats moving it
    busy = m.hosts[0].instances["busy"]

    async def loaded(host, spec, inst, tier):  # stands in for Triton's load (and the eviction it would do)
        if len(host.resident()) > host.cfg.max_models:
            victim = m._evictable(host)
            del host.instances[victim.model]
        inst.state, inst.loaded_at = "ready", 1.0
        inst.ready.set()

    m._load = loaded

    async def scenario():
        task = asyncio.ensure_future(m.acquire("new"))
        await asyncio.sleep(0.35)
        assert not task.done()  # still waiting for the stream
        busy.inflight = 0  # the stream ends
        del m.sessions["r"]
        return await asyncio.wait_for(task, 5)

    inst = asyncio.run(scenario())
    assert inst.host.name == "h0" and inst.state == "ready"
    assert [e["decision"] for e in m.placement_log] == ["wait"]
    assert "busy" not in m.hosts[0].instances  # evicted to make room


def test_recompute_estimate_learns_from_migrations():
    h = Host(RouterConfig.parse({"hosts": HOSTS}).hosts[0])
    for _ in range(8):
        h.observe_recompute(20000, h.recompute_overhead_s + 2.0)  # 20k tokens in 2 s beyond the fixed cost
    assert h.estimate_recompute_s(20000) == pytest.approx(h.recompute_overhead_s + 2.0, rel=0.05)


def test_host_device_and_bandwidth_config():
    cfg = RouterConfig.parse({"hosts": [{**HOSTS[0], "device": "gpu:1", "bandwidth": {"disk": 2e9}},
                                        {**HOSTS[1]}]})
    assert cfg.hosts[0].instance_group == {"count": 1, "kind": "KIND_GPU", "gpus": [1]}
    assert cfg.hosts[1].instance_group == {"count": 1, "kind": "KIND_CPU"}
    assert Host(cfg.hosts[0]).bandwidth["disk"] == 2e9 and not cfg.placement_migration
    for bad, fragment in (({"device": "tpu"}, "device"), ({"bandwidth": {"ssd": 1}}, "bandwidth")):
        with pytest.raises(ConfigError) as e:
            RouterConfig.parse({"hosts": [{**HOSTS[0], **bad}]})
        assert fragment in str(e.value)
    with pytest.raises(ConfigError):
        RouterConfig.parse({"hosts": HOSTS, "placement_migration": "yes"})


def test_migrating_a_finished_request_fails_at_once():
    """Placement may pick a stream that ends before its migration is taken up: the caller gets a 409, not a
    wait that never ends."""
    import asyncio

    from tritonmoe.router.lifecycle import RouterError

    s, _ = _session()

    async def ask_while_ending():
        fut = asyncio.ensure_future(s.migrate("h1"))
        await asyncio.sleep(0)
        gen = s.run()  # a run that ends at once: its first step fails (no host answers) and ends the stream
        try:
            await gen.__anext__()
        except Exception:  # noqa: BLE001
            pass
        await gen.aclose()
        return await asyncio.wait_for(fut, 5)

    with pytest.raises(RouterError) as e:
        asyncio.run(ask_while_ending())
    assert e.value.status == 409
    with pytest.raises(RouterError):
        asyncio.run(s.migrate("h1"))  # after the end: refused at once


def test_cli_help_documents_the_flags():
    out = subprocess.run([sys.executable, "-m", "tritonmoe.router", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ("--config", "--host", "--port", "--policy", "--token-file", "--placement-migration"):
        assert flag in out.stdout
    bad = subprocess.run([sys.executable, "-m", "tritonmoe.router", "--config", "/nonexistent.json"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "nonexistent" in bad.stderr


# ---- warm engine-pool workers in the start-up estimate ----------------------------------------------------------
def _pool_status(warm: dict, claimed: dict | None = None, starting: dict | None = None, warmup_s: float = 10.0,
                 per_device: int = 2) -> dict:
    """A ``pool_status`` reply (backend/engine_pool.py EnginePool.status): ``claimed`` {device: [model, ...]},
    ``starting`` {device: [age_s, ...]}; every warm or claimed worker reports warm-up phases summing to warmup_s."""
    phases = {"imports": warmup_s / 2, "kernels": warmup_s / 2}
    workers = []
    for d, n in warm.items():
        workers += [{"pid": 1, "device": d, "state": "warm", "model": None, "warm": {"phases": phases},
                     "age_s": 60}] * n
    for d, models in (claimed or {}).items():
        workers += [{"pid": 2, "device": d, "state": "claimed", "model": m, "warm": {"phases": phases}, "age_s": 60}
                    for m in models]
    for d, ages in (starting or {}).items():
        workers += [{"pid": 3, "device": d, "state": "starting", "model": None, "warm": None, "age_s": a}
                    for a in ages]
    return {"ok": True, "devices": list(warm), "per_device": per_device, "warm": warm, "claims": 0, "workers": workers}


def _pooled_manager(devices, models=("a",), overhead_s=0.5):
    """Hosts h0.. on ``devices`` (gpu:N), all naming one engine pool; models of 1 GB from disk (1 s at 1 GB/s)."""
    hosts = [{**HOSTS[0], "name": f"h{i}", "device": d, "engine_pool": "/tmp/tmoe-test-pool.sock"}
             for i, d in enumerate(devices)]
    cfg = RouterConfig.parse({"hosts": hosts, "models": {m: {"checkpoint": f"/{m}"} for m in models}})
    m = Manager(cfg, [Host(h) for h in cfg.hosts], LocalityPolicy())
    m._bytes.update({name: 10**9 for name in models})
    for h in m.hosts:
        h.overhead_s = overhead_s  # a pooled load's learned fixed cost
    return m


def test_pool_device_names_follow_the_backend():
    cfg = RouterConfig.parse({"hosts": [{**HOSTS[0], "device": "gpu"}, {**HOSTS[1], "device": "gpu:3"}, HOSTS[2]]})
    # the router's KIND_GPU instance on GPU N is the backend's cuda:N (serving.py: model_instance_device_id)
    assert [h.pool_device for h in cfg.hosts] == ["cuda:0", "cuda:3", "cpu"]
    assert cfg.hosts[0].instance_group["gpus"] == [0]


def test_locality_prefers_a_device_with_a_warm_pool_worker():
    m = _pooled_manager(["gpu:0", "gpu:1"])
    h0, h1 = m.hosts
    assert h0.pool is h1.pool  # one pool per socket, shared by its hosts
    h0.pool.update(_pool_status({"cuda:0": 0, "cuda:1": 2}, claimed={"cuda:0": ["other"]},
                                starting={"cuda:0": [0.0]}, warmup_s=11.0))
    h1.loads_in_flight = 1  # h1's queue estimate is a little worse (one load in flight: +0.5 s)
    spec = m.specs["a"]
    cands = {c.host.name: c for c in m.candidates(spec)}
    assert cands["h0"].pool_wait_s == pytest.approx(11.0, abs=0.1) and cands["h1"].pool_wait_s == 0
    assert cands["h1"].queue_s > cands["h0"].queue_s
    assert m.policy.choose(spec, list(cands.values()), 0).host.name == "h1"
    # the same hosts without a word from the pool about warm workers (unknown): h0, the shorter queue
    h0.pool.unknown("test")
    cands = m.candidates(spec)
    assert all(c.pool_wait_s == pytest.approx(11.0, abs=0.1) for c in cands)  # the warm-up it last reported
    assert m.policy.choose(spec, cands, 0).host.name == "h0"
    # a model that opts out of the pool waits for no worker anywhere
    m.specs["a"].use_engine_pool = False
    assert all(c.pool_wait_s == 0 for c in m.candidates(spec))


def test_a_burst_of_cold_starts_is_spread_over_the_warm_workers():
    import asyncio

    # four servers on two GPUs (h0, h2 on GPU 0; h1, h3 on GPU 1), one pool: 1 warm worker on GPU 0, 2 on GPU 1
    m = _pooled_manager(["gpu:0", "gpu:1", "gpu:0", "gpu:1"], models=("a", "b", "c", "d"))
    view = m.hosts[0].pool
    view.update(_pool_status({"cuda:0": 1, "cuda:1": 2}))

    async def loaded(host, spec, inst, tier):  # stands in for Triton's load: ready at once
        host.loads_in_flight += 1
        await asyncio.sleep(0.05)
        host.loads_in_flight -= 1
        inst.state, inst.loaded_at = "ready", 1.0
        inst.ready.set()

    m._load = loaded

    async def burst(models):
        insts = await asyncio.gather(*(m.acquire(name) for name in models))
        return {i.model: i.host.pool_device for i in insts}

    placed = asyncio.run(burst(["a", "b", "c"]))
    per_device = collections.Counter(placed.values())
    assert per_device == {"cuda:0": 1, "cuda:1": 2}, placed  # no device gets more cold starts than warm workers
    assert [h.instances[name].pool_wait_s for name in placed for h in m.hosts if name in h.instances] == [0, 0, 0]
    # ready, but the pool has not reported the claims yet: they still count against its (stale) warm counts
    assert m.pool_pending(view, "cuda:0") == 1 and m.pool_pending(view, "cuda:1") == 2
    # the pool's next status shows the claims; GPU 0's replacement is nearly warm, GPU 1's two just started
    view.update(_pool_status({"cuda:0": 0, "cuda:1": 0}, warmup_s=10.0,
                             claimed={d: [k for k, v in placed.items() if v == d] for d in ("cuda:0", "cuda:1")},
                             starting={"cuda:0": [9.0], "cuda:1": [1.0, 1.0]}))
    assert m.pool_pending(view, "cuda:0") == 0 and m.pool_pending(view, "cuda:1") == 0
    # no warm worker anywhere: the next cold start goes where a worker will be warm first
    cands = m.candidates(m.specs["d"])
    assert {c.host.pool_device: round(c.pool_wait_s) for c in cands} == {"cuda:0": 1, "cuda:1": 9}
    assert asyncio.run(burst(["d"])) == {"d": "cuda:0"}
    # a load predicted to wait for a worker does not teach the pooled fixed cost
    h = next(h for h in m.hosts if "d" in h.instances)
    assert h.instances["d"].pool_wait_s == pytest.approx(1.0, abs=0.1)
    h.observe_load("disk", 10**9, 11.5, h.instances["d"].pool_wait_s)
    assert h.waited_loads_observed == 1 and h.overhead_s == 0.5


def test_an_unreachable_or_hung_pool_counts_as_no_warm_worker(tmp_path, caplog):
    import asyncio
    import socket

    from tritonmoe.router.state import Poller

    m = _pooled_manager(["gpu:0", "gpu:1"])
    h0, h1 = m.hosts
    view = h0.pool
    view.update(_pool_status({"cuda:0": 2, "cuda:1": 2}, warmup_s=7.0))
    assert m.pool_wait_s(h0, m.specs["a"]) == 0
    poller = Poller(m.hosts, 1.0, pool_timeout=0.5)
    assert list(poller.pools.values()) == [view]

    async def polls(n):
        for _ in range(n):
            t = time.monotonic()
            await poller.poll_pool(view)
            assert time.monotonic() - t < 2.0
            await asyncio.sleep(0.05)  # a refused connection's thread ends at once

    # no pool at that socket: unknown (cold on every device), logged once however often it is asked
    with caplog.at_level(logging.WARNING, logger="tritonmoe.router"):
        asyncio.run(polls(3))
    assert view.warm is None and "cannot reach the engine pool" in view.error
    assert sum("engine pool /tmp/tmoe-test-pool.sock" in r.getMessage() for r in caplog.records) == 1
    assert m.pool_wait_s(h0, m.specs["a"]) == pytest.approx(7.0) and m.pool_wait_s(h1, m.specs["a"]) == 7.0

    # a pool that accepts the connection but never answers: unknown after the timeout, and one thread at most
    path = str(tmp_path / "hung.sock")
    (tmp_path / "hung.sock.key").write_text("00" * 32)
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(path)
    hung.listen(8)
    view.socket = path
    view.update(_pool_status({"cuda:0": 2, "cuda:1": 2}))
    try:
        asyncio.run(polls(1))
        assert view.warm is None and "no answer within 0.5s" in view.error and view.querying
        asyncio.run(polls(2))  # still out: not asked again
        assert view.querying and sum(t.name == "pool-status" for t in threading.enumerate()) == 1
    finally:
        hung.close()
    deadline = time.monotonic() + 10
    while view.querying and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not view.querying  # the stuck query ended with the socket
