"""The router in front of three real tritonserver processes: Triton generate / generate_stream and OpenAI APIs
through it equal transformers' greedy output, clear 4xx for bad requests, bearer token, live migration of greedy
and seeded streams (identical to unmigrated ones), scale to zero, scale out, and a failing load."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import PROMPTS
from tritonmoe.router.config import RouterConfig
from tritonmoe.router.harness import HTTPError, RouterThread, call, stream
from tritonmoe.tools.tritonserver import TritonServer

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token"


def start_servers(n: int, tmp: Path) -> list[TritonServer]:
    """n servers over empty repositories (the router sends model code and config with each load)."""
    # sysconfig fills its variables lazily and not thread-safely: a first call racing in several threads can
    # return LIBDIR None, and a server started without libpython on LD_LIBRARY_PATH fails every model load
    sysconfig.get_config_vars()
    servers = []
    for i in range(n):
        (tmp / f"repo{i}").mkdir()
        servers.append(TritonServer(tmp / f"repo{i}", log_path=tmp / f"server{i}.log",
                                   extra_args=["--disable-auto-complete-config"]))
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda s: s.start(timeout=120), servers))
    return servers


def hosts_doc(servers) -> list[dict]:
    return [{"name": f"h{i}", "http": s.http_url, "grpc": s.grpc_url, "metrics": s.metrics_url}
            for i, s in enumerate(servers)]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def server_models(server: TritonServer) -> set[str]:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/stats", timeout=5) as r:
        return {m["name"] for m in json.loads(r.read())["model_stats"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("router")
    servers = start_servers(3, tmp)
    cfg = RouterConfig.parse({
        "hosts": hosts_doc(servers), "listen": {"port": 0}, "poll_interval_s": 0.5,
        "models": {
            "greedy": {"checkpoint": str(tiny("mixtral")), "min_instances": 2, "max_instances": 2},
            "idle": {"checkpoint": str(tiny("qwen3_moe")), "keep_alive_s": 2},
            "scale": {"checkpoint": str(tiny("olmoe")), "max_instances": 2, "target_concurrency": 1},
        }})
    cfg.token = TOKEN
    router = RouterThread(cfg).start()
    router.servers = servers
    try:
        wait_for(lambda: sum(1 for h in router.router.hosts if h.ready_instance("greedy")) == 2, 240,
                 "min_instances=2 of 'greedy' to load")
        yield router
    finally:
        router.stop()
        for s in servers:
            s.stop()


def api(cluster, path, body=None, **kw):
    return call(cluster.url + path, body, token=TOKEN, **kw)


def sse(cluster, path, body, **kw):
    return stream(cluster.url + path, body, token=TOKEN, **kw)


def finished(cluster, rid: str) -> dict:
    return next(r for r in api(cluster, "/admin/requests")["finished"] if r["id"] == rid)


def test_triton_generate_through_router_equals_transformers(cluster, tiny, reference):
    ids, text = reference(tiny("mixtral"), PROMPTS[0], 12)
    r = api(cluster, "/v2/models/greedy/generate", {"text_input": PROMPTS[0], "parameters": {"max_tokens": 12}})
    assert r["text_output"] == PROMPTS[0] + text  # prompt prepended unless excluded, as Triton's vLLM contract
    assert r["output_token_ids"] == ids and r["num_output_tokens"] == len(ids)
    r = api(cluster, "/v2/models/greedy/generate", {"text_input": PROMPTS[0], "exclude_input_in_output": True,
                                                    "sampling_parameters": json.dumps({"max_tokens": 12})})
    assert r["text_output"] == text
    events = list(sse(cluster, "/v2/models/greedy/generate_stream",
                      {"text_input": PROMPTS[1], "stream": True, "parameters": {"max_tokens": 12}}))
    ids1, text1 = reference(tiny("mixtral"), PROMPTS[1], 12)
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == text1
    assert [t for e in events for t in e["output_token_ids"]] == ids1
    assert events[-1]["finish_reason"] in ("length", "stop") and all(e["finish_reason"] == "" for e in events[:-1])


def test_openai_completions_chat_and_models(cluster, tiny, reference):
    _, text = reference(tiny("mixtral"), PROMPTS[2], 10)
    r = api(cluster, "/v1/completions", {"model": "greedy", "prompt": PROMPTS[2], "max_tokens": 10,
                                         "temperature": 0})
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == text
    assert r["usage"]["completion_tokens"] == 10 and r["usage"]["prompt_tokens"] > 0
    chunks = list(sse(cluster, "/v1/completions", {"model": "greedy", "prompt": PROMPTS[2], "max_tokens": 10,
                                                   "temperature": 0, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    chat = list(sse(cluster, "/v1/chat/completions", {"model": "greedy", "max_tokens": 6, "temperature": 0,
                                                      "stream": True,
                                                      "messages": [{"role": "user", "content": "hello"}]}))
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant" and chat[0]["object"] == "chat.completion.chunk"
    prompt = "user: hello\nassistant:"
    _, chat_text = reference(tiny("mixtral"), prompt, 6)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chat) == chat_text
    whole = api(cluster, "/v1/chat/completions", {"model": "greedy", "max_tokens": 6, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "hello"}]})
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": chat_text}
    models = api(cluster, "/v1/models")
    assert {m["id"] for m in models["data"]} >= {"greedy", "idle", "scale"}
    assert next(m for m in models["data"] if m["id"] == "greedy")["instances"] == 2


def test_openapi_health_and_bearer_token(cluster):
    spec = api(cluster, "/openapi.json")
    assert "/v1/chat/completions" in spec["paths"] and "/v2/models/{model}/generate_stream" in spec["paths"]
    assert call(cluster.url + "/health")["status"] == "ok"  # liveness needs no token
    with pytest.raises(HTTPError) as e:
        call(cluster.url + "/v1/models")
    assert e.value.status == 401
    with pytest.raises(HTTPError) as e:
        call(cluster.url + "/v1/models", token="wrong")
    assert e.value.status == 401
    assert cluster.cfg.listen_host == "127.0.0.1"


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v2/models/nope/generate", {"text_input": "hi"}, 404, "unknown model 'nope'"),
    ("/v2/models/a..b/generate", {"text_input": "hi"}, 400, "invalid model name"),
    ("/v2/models/greedy/generate", b"{not json", 400, "must be a JSON object"),
    ("/v2/models/greedy/generate", {"parameters": {}}, 400, "'text_input'"),
    ("/v2/models/greedy/generate", {"text_input": "hi", "bogus": 1}, 400, "unknown field(s) ['bogus']"),
    ("/v2/models/greedy/generate", {"text_input": "hi", "parameters": {"max_tokens": 0}}, 400,
     "'max_tokens' must be >= 1"),  # the backend's own validation, passed through as a 400
    ("/v2/models/greedy/generate", {"text_input": "hi", "parameters": {"top_q": 1}}, 400, "top_q"),
    ("/v1/completions", {"model": "greedy", "prompt": "hi", "n": 2}, 400, "'n' must be 1"),
    ("/v1/completions", {"model": "../../etc/passwd", "prompt": "hi"}, 400, "invalid model name"),
    ("/v1/chat/completions", {"model": "greedy", "messages": [{"role": "god", "content": "x"}]}, 400,
     "messages[0]"),
    ("/admin/models", {"name": "evil", "checkpoint": "relative/../../x"}, 400, "checkpoint"),
    ("/admin/models", {"name": "evil", "checkpoint": "/x", "parameters": {"loader_url": "http://x"}}, 400,
     "'loader_url' is not allowed"),
    ("/admin/models", {"name": "../evil", "checkpoint": "/x"}, 400, "invalid model name"),
])
def test_bad_requests_get_clear_4xx(cluster, path, body, status, fragment):
    with pytest.raises(HTTPError) as e:
        api(cluster, path, body)
    assert e.value.status == status and fragment in e.value.message, e.value.message
    assert api(cluster, "/v2/models/greedy/generate", {"text_input": "ok", "parameters": {"max_tokens": 2}})[
        "num_output_tokens"] == 2


def run_stream(cluster, model, prompt, params, migrate_at=None):
    """(token ids, text, request id) of one generate_stream; optionally migrated once ``migrate_at`` tokens are
    out (scheduled in the router: the client reads far behind a tiny model's generation)."""
    rid, ids, text = {}, [], []
    body = {"text_input": prompt, "stream": True, "parameters": params}

    def opened(headers):
        rid["id"] = headers["X-Request-Id"]
        if migrate_at:
            api(cluster, f"/admin/requests/{rid['id']}/migrate", {"at_token": migrate_at})

    for ev in sse(cluster, f"/v2/models/{model}/generate_stream", body, on_open=opened):
        ids += ev["output_token_ids"]
        text.append(ev["text_output"])
    return ids, "".join(text), rid["id"]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 50, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_live_migration_keeps_the_stream_identical(cluster, tiny, reference, sampling):
    params = {"max_tokens": 400, "ignore_eos": True, **sampling}
    base_ids, base_text, _ = run_stream(cluster, "greedy", PROMPTS[3], params)
    # As below: on a loaded machine the source can finish its 400 tokens before the destination catches up (no
    # handover, nothing merged), so the scenario gets three tries; every try's stream must equal the base.
    for _ in range(3):
        ids, text, rid = run_stream(cluster, "greedy", PROMPTS[3], params, migrate_at=8)
        info = finished(cluster, rid)
        assert info["migrations"] == 1 and len(set(info["hosts_used"])) == 2, info
        assert ids == base_ids and text == base_text  # no gap, duplicate or lost token
        if info["handover_at"]:
            break
    assert info["handover_at"] and info["handover_at"][0] < 400, f"the source was never stopped mid-stream: {info}"
    assert len(ids) == 400
    if not sampling:
        ref_ids = reference(tiny("mixtral"), PROMPTS[3], 400)[0]  # stops at EOS; the stream ignores it
        assert ids[:len(ref_ids)] == ref_ids


def test_unseeded_sampled_requests_get_a_seed_and_migrate_identically(cluster):
    """The router seeds sampled requests that came without a seed, so their migrated continuation is the same
    sample the source would have drawn (checked by the router's merge: diverging tokens would drop the
    destination and leave no handover)."""
    # A handover needs the destination to catch up before the source's 400 tokens are done: on a loaded machine
    # the source can win that race (then nothing was compared), so the scenario gets three tries. Diverging
    # samples fail every try.
    for _ in range(3):
        ids, _, rid = run_stream(cluster, "greedy", PROMPTS[0], {"max_tokens": 400, "ignore_eos": True,
                                                                "temperature": 1.0}, migrate_at=8)
        info = finished(cluster, rid)
        assert len(ids) == 400 and info["migrations"] == 1, info
        if info["handover_at"]:
            break
    assert info["handover_at"], f"the destination never took over: {info}"


def test_keep_alive_expiry_scales_to_zero(cluster):
    r = api(cluster, "/v2/models/idle/generate", {"text_input": "hi", "parameters": {"max_tokens": 3}})
    assert r["num_output_tokens"] == 3
    host = next(h for h in cluster.router.hosts if "idle" in h.instances)
    server = cluster.servers[int(host.name[1:])]
    assert "idle" in server_models(server)
    wait_for(lambda: not any("idle" in h.instances for h in cluster.router.hosts), 30, "keep-alive unload")
    wait_for(lambda: "idle" not in server_models(server), 30, "the server to unload 'idle'")
    assert next(m for m in api(cluster, "/v1/models")["data"] if m["id"] == "idle")["instances"] == 0


def test_scale_out_under_load(cluster):
    """target_concurrency 1, max_instances 2: concurrent streams on one instance start a second one."""
    api(cluster, "/v2/models/scale/generate", {"text_input": "warm", "parameters": {"max_tokens": 2}})
    assert sum(1 for h in cluster.router.hosts if h.ready_instance("scale")) == 1
    params = {"max_tokens": 300, "ignore_eos": True}
    threads = [threading.Thread(target=lambda p=p: run_stream(cluster, "scale", p, params)) for p in PROMPTS[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wait_for(lambda: sum(1 for h in cluster.router.hosts if h.ready_instance("scale")) == 2, 120,
             "a second instance of 'scale'")
    hosts = {h.name for h in cluster.router.hosts if h.ready_instance("scale")}
    assert len(hosts) == 2
    assert api(cluster, "/v2/models/scale/generate", {"text_input": "x", "parameters": {"max_tokens": 2}})[
        "num_output_tokens"] == 2


def test_failed_load_is_a_clear_error_without_retry_storm(cluster, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    assert api(cluster, "/admin/models", {"name": "broken", "checkpoint": str(missing)})["deployed"] == "broken"
    before = len(cluster.router.manager.cold_starts), _failures(cluster)
    body = {"text_input": "hi", "parameters": {"max_tokens": 2}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(api, cluster, "/v2/models/broken/generate", body) for _ in range(4)]
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, HTTPError) for e in errors)
    assert any(e.status == 502 and "does not exist" in e.message for e in errors), [str(e) for e in errors]
    t0 = time.monotonic()
    with pytest.raises(HTTPError) as e:
        api(cluster, "/v2/models/broken/generate", body)
    assert e.value.status == 503 and "not retried" in e.value.message and "does not exist" in e.value.message
    assert time.monotonic() - t0 < 2, "a request during the backoff must fail at once"
    assert _failures(cluster) == before[1] + 1, "one load attempt for five requests"
    assert api(cluster, "/admin/models")["models"][-1]["last_load_error"]
    api(cluster, "/admin/models/broken", method="DELETE")
    with pytest.raises(HTTPError) as e:
        api(cluster, "/v2/models/broken/generate", body)
    assert e.value.status == 404


def _failures(cluster) -> float:
    text = urllib.request.urlopen(urllib.request.Request(
        cluster.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tritonmoe_router_load_failures_total{"))


def _server_metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_client_disconnect_cancels_the_request_on_the_server(cluster):
    """A client that goes away frees its sequence on the server (the router closes the gRPC stream)."""
    before = sum(_server_metric(s, "tritonmoe_requests_total", model="greedy", outcome="cancelled")
                 for s in cluster.servers)
    req = urllib.request.Request(cluster.url + "/v2/models/greedy/generate_stream", data=json.dumps(
        {"text_input": "cancel me", "stream": True, "parameters": {"max_tokens": 480, "ignore_eos": True}}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}"})

    def cancelled() -> bool:
        return sum(_server_metric(s, "tritonmoe_requests_total", model="greedy", outcome="cancelled")
                   for s in cluster.servers) > before

    # The tiny model can finish its 480 tokens before a loaded machine notices the closed socket (then there is
    # nothing left to cancel): three tries. A router that never cancels fails all three.
    for _ in range(3):
        r = urllib.request.urlopen(req, timeout=60)
        assert r.readline().startswith(b"data:")
        r.close()
        try:
            wait_for(cancelled, 15, "the server to cancel the request")
            break
        except AssertionError:
            continue
    assert cancelled(), "the server never saw the request cancelled"
    wait_for(lambda: not api(cluster, "/admin/requests")["requests"], 10, "the router to drop the session")


def test_command_with_local_servers(tiny, reference, tmp_path):
    """``python -m tritonmoe.router --local-servers 1 --deploy ...``: the single-machine multi-server mode serves
    the deployed model, and stopping the router stops its servers."""
    import signal
    import subprocess
    import sys

    from tritonmoe.tools.tritonserver import free_port

    port = free_port()
    log = open(tmp_path / "router.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tritonmoe.router", "--local-servers", "1", "--port", str(port),
                             "--deploy", f"cli={tiny('mixtral')}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), 120, "the router command to listen")
        _, text = reference(tiny("mixtral"), PROMPTS[1], 6)
        r = call(url + "/v2/models/cli/generate", {"text_input": PROMPTS[1], "exclude_input_in_output": True,
                                                   "parameters": {"max_tokens": 6}})
        assert r["text_output"] == text
        hosts = call(url + "/admin/hosts")["hosts"]
        assert [h["name"] for h in hosts] == ["h0"] and hosts[0]["instances"]["cli"]["state"] == "ready"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    out = (tmp_path / "router.log").read_text()
    server_log = out.split("log ")[-1].split()[0]
    assert "local tritonserver h0" in out and Path(server_log).exists()
    pids = subprocess.run(["pgrep", "-f", server_log.rsplit("/", 1)[0]], capture_output=True, text=True).stdout
    assert pids.strip() == "", "the router's local servers outlived it"


def _up(url: str) -> bool:
    try:
        return call(url + "/health", timeout=2)["status"] == "ok"
    except Exception:  # noqa: BLE001
        return False


def test_model_unloaded_behind_the_routers_back(cluster, tiny, reference):
    """Someone unloads an instance directly on a server: requests still succeed (the stream fails over, or the
    poll notices first) and min_instances brings the instance back."""
    host = next(h for h in cluster.router.hosts if h.ready_instance("greedy"))
    server = cluster.servers[int(host.name[1:])]
    req = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/greedy/unload", data=b"{}")
    urllib.request.urlopen(req, timeout=60).read()
    wait_for(lambda: "greedy" not in server_models(server), 30, "the direct unload")
    ids, _ = reference(tiny("mixtral"), PROMPTS[2], 6)
    for _ in range(3):
        r = api(cluster, "/v2/models/greedy/generate", {"text_input": PROMPTS[2], "parameters": {"max_tokens": 6}})
        assert r["output_token_ids"] == ids
    wait_for(lambda: sum(1 for h in cluster.router.hosts if h.ready_instance("greedy")) == 2, 120,
             "min_instances to restore the second instance")


def test_genai_perf_profiles_the_routers_openai_api(cluster, tiny, tmp_path):
    """genai-perf as users run it against an OpenAI-compatible server: the router's /v1/completions, streaming,
    with the bearer token; every request streams to a "length" finish and [DONE]."""
    from tritonmoe.tools import genai_perf

    requests, input_tokens, output_tokens = 8, 24, 8
    summary, raw = genai_perf.profile("greedy", cluster.url.removeprefix("http://"), tiny("mixtral"),
                                      tmp_path / "artifacts", input_tokens=input_tokens, output_tokens=output_tokens,
                                      requests=requests, concurrency=2, endpoint="completions",
                                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=400)
    assert summary["request_count"]["avg"] == requests
    assert summary["time_to_first_token"]["avg"] > 0
    assert summary["input_sequence_length"]["avg"] == input_tokens
    done = raw["experiments"][0]["requests"]
    assert len(done) >= requests
    for request in done:
        events = [line[5:].strip() for out in request["response_outputs"]
                  for line in out["response"].splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert 1 <= len(chunks) <= output_tokens  # one chunk per token at most (text can be held back)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["model"] == "greedy" for c in chunks)
