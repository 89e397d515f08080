"""End to end through a real tritonserver: HTTP generate/generate_stream, gRPC streaming, the repository API,
bad input, cancellation and metrics. Greedy output must equal transformers' generate() on the same checkpoint."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ARCHS, PROMPTS, write_model
from tritonmoe.tools.client import GenerateError, generate, generate_stream

pytestmark = pytest.mark.e2e


def metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_http_generate_equals_transformers(triton, tiny, reference, arch):
    ids, text = reference(tiny(arch), PROMPTS[0], 12)
    r = generate(triton.http_url, f"moe_{arch}", PROMPTS[0], max_tokens=12)
    assert r["text_output"] == PROMPTS[0] + text  # the prompt is prepended unless excluded (vLLM's convention)
    assert r["num_output_tokens"] == len(ids)
    assert r["num_input_tokens"] > 0 and r["finish_reason"] in ("length", "stop")


def test_generate_stream_sends_deltas_that_add_up(triton, tiny, reference):
    _, text = reference(tiny("deepseek_v3"), PROMPTS[1], 12)
    events = list(generate_stream(triton.http_url, "moe_deepseek_v3", PROMPTS[1], max_tokens=12))
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == text
    assert [e["finish_reason"] for e in events][-1] in ("length", "stop")
    assert all(e["finish_reason"] == "" for e in events[:-1])


def _grpc_inputs(prompt: bytes, stream=True, sampling=None, exclude=None):
    inputs = []
    for name, value, dtype in [("text_input", np.array([prompt], dtype=np.object_), "BYTES"),
                               ("stream", np.array([stream], dtype=bool), "BOOL"),
                               ("sampling_parameters",
                                np.array([json.dumps(sampling or {}).encode()], dtype=np.object_), "BYTES"),
                               ("exclude_input_in_output", np.array([exclude], dtype=bool) if exclude is not None
                                else None, "BOOL")]:
        if value is None:
            continue
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    return inputs


def grpc_stream(server, model, prompt: bytes, sampling, **kw):
    """All responses of one request over gRPC bidirectional streaming: (texts, final response or error)."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, _grpc_inputs(prompt, sampling=sampling, **kw), enable_empty_final_response=True)
    texts = []
    try:
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                return texts, error
            response = result.get_response()
            if result.as_numpy("text_output") is not None:
                texts.append(result.as_numpy("text_output")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                return texts, result
    finally:
        client.stop_stream()
        client.close()


def test_grpc_streaming_equals_transformers(triton, tiny, reference):
    _, text = reference(tiny("qwen2_moe"), PROMPTS[2], 10)
    texts, final = grpc_stream(triton, "moe_qwen2_moe", PROMPTS[2].encode(), {"max_tokens": 10})
    assert not isinstance(final, Exception)
    assert "".join(texts) == text


def test_concurrent_requests_overlap_and_each_is_correct(triton, tiny, reference):
    """Continuous batching: a short request started while a long one runs finishes before the long one does."""
    arch = "olmoe"
    results = {}

    def run(key, prompt, n):
        events, stamps = [], []
        for e in generate_stream(triton.http_url, f"moe_{arch}", prompt, max_tokens=n, ignore_eos=True):
            events.append(e)
            stamps.append(time.monotonic())
        results[key] = (events, stamps)

    long = threading.Thread(target=run, args=("long", PROMPTS[0], 480))  # long enough to outlast a loaded CI box
    long.start()
    time.sleep(0.3)
    shorts = [threading.Thread(target=run, args=(f"short{i}", PROMPTS[1 + i], 8)) for i in range(2)]
    for t in shorts:
        t.start()
    for t in shorts + [long]:
        t.join(120)
    long_events, long_stamps = results["long"]
    assert long_events[-1]["num_output_tokens"] == 480
    for i in range(2):
        events, stamps = results[f"short{i}"]
        assert events[-1]["num_output_tokens"] == 8
        assert stamps[-1] < long_stamps[-1], "the short request waited for the long one: no continuous batching"
    # each streamed text equals the same request run alone
    for i in range(2):
        alone = generate(triton.http_url, f"moe_{arch}", PROMPTS[1 + i], max_tokens=8, ignore_eos=True)
        assert PROMPTS[1 + i] + "".join(e["text_output"] for e in results[f"short{i}"][0]) == alone["text_output"]


@pytest.mark.parametrize("body, fragment", [
    ({"parameters": {"max_tokens": 4}}, "missing required input(s) ['text_input']"),  # Triton's own check
    ({"text_input": "", "parameters": {"max_tokens": 4}}, "'text_input' is empty"),
    ({"text_input": "hi", "sampling_parameters": "{oops"}, "'sampling_parameters' is not valid JSON"),
    ({"text_input": "hi", "parameters": {"max_tokens": 0}}, "'max_tokens' must be >= 1"),
    ({"text_input": "hi", "parameters": {"max_tokens": 100000}}, "smaller than the model's context"),
    ({"text_input": "hi", "parameters": {"temperature": "hot"}}, "'temperature' must be a number >= 0"),
    ({"text_input": "hi", "parameters": {"top_q": 0.5}}, "unknown request parameter(s) 'top_q'"),
    ({"text_input": "word " * 2000}, "the model's context is"),
])
def test_bad_requests_get_clear_errors_and_the_server_carries_on(triton, body, fragment):
    req = urllib.request.Request(f"http://{triton.http_url}/v2/models/moe_mixtral/generate",
                                 data=json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400
    assert fragment in json.loads(e.value.read())["error"]
    assert generate(triton.http_url, "moe_mixtral", "ok", max_tokens=2)["num_output_tokens"] >= 1


def test_non_utf8_prompt_and_unknown_model(triton):
    texts, final = grpc_stream(triton, "moe_mixtral", b"\xff\xfe\xfd", {"max_tokens": 3})
    assert isinstance(final, InferenceServerException) and "not valid UTF-8" in str(final)
    with pytest.raises(GenerateError) as e:
        generate(triton.http_url, "no_such_model", "hi", max_tokens=2)
    assert e.value.status in (400, 404) and "no_such_model" in e.value.message


def test_grpc_stream_cancellation_frees_the_sequence(triton):
    before = metric(triton, "tritonmoe_requests_total", model="moe_mixtral", outcome="cancelled")
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("moe_mixtral", _grpc_inputs(b"cancel me", sampling={"max_tokens": 500,
                                                                                    "ignore_eos": True}))
    for _ in range(3):
        result, error = results.get(timeout=60)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 30
    while metric(triton, "tritonmoe_requests_total", model="moe_mixtral", outcome="cancelled") <= before:
        assert time.monotonic() < deadline, "the server never noticed the cancelled stream"
        time.sleep(0.2)
    assert metric(triton, "tritonmoe_running_sequences", model="moe_mixtral") == 0
    assert generate(triton.http_url, "moe_mixtral", "still alive", max_tokens=3)["num_output_tokens"] >= 1


def test_metrics_are_exported(triton):
    generate(triton.http_url, "moe_qwen3_moe", PROMPTS[0], max_tokens=5, ignore_eos=True)
    assert metric(triton, "tritonmoe_generation_tokens_total", model="moe_qwen3_moe") >= 5
    assert metric(triton, "tritonmoe_time_to_first_token_seconds_count", model="moe_qwen3_moe") >= 1
    assert metric(triton, "tritonmoe_inter_token_latency_seconds_count", model="moe_qwen3_moe") >= 4
    assert metric(triton, "tritonmoe_requests_total", model="moe_qwen3_moe", outcome="length") >= 1


def test_repository_api_index_load_override_unload(triton, tiny, reference):
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300)
    try:
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert all(index[f"moe_{a}"]["state"] == "READY" for a in ARCHS)
        # a second model, loaded with a config override that points it at another architecture
        write_model(triton.repo, "extra", tiny("mixtral"))
        config = json.loads(json.dumps(client.get_model_config("moe_olmoe")))
        config["name"] = "extra"
        config["parameters"]["max_num_seqs"] = {"string_value": "2"}
        client.load_model("extra", config=json.dumps(config))
        assert client.is_model_ready("extra")
        assert client.get_model_config("extra")["parameters"]["max_num_seqs"]["string_value"] == "2"
        _, text = reference(tiny("olmoe"), PROMPTS[3], 6)
        r = generate(triton.http_url, "extra", PROMPTS[3], max_tokens=6, exclude_input_in_output=True)
        assert r["text_output"] == text
        client.unload_model("extra")
        deadline = time.monotonic() + 60  # unload does not wait; the index says when it is done
        while (entry := {m["name"]: m for m in client.get_model_repository_index()}["extra"])["state"] != "UNAVAILABLE":
            assert entry["state"] == "UNLOADING" and time.monotonic() < deadline
            time.sleep(0.2)
        assert entry["reason"] == "unloaded" and not client.is_model_ready("extra")
        with pytest.raises(GenerateError):
            generate(triton.http_url, "extra", "hi", max_tokens=2)
    finally:
        client.close()


def test_missing_and_corrupt_checkpoints_fail_to_load_clearly(triton, tiny, tmp_path):
    import shutil

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        write_model(triton.repo, "missing", tmp_path / "nowhere")
        with pytest.raises(InferenceServerException, match=r"checkpoint folder .*nowhere does not exist"):
            client.load_model("missing")
        broken = tmp_path / "broken"
        shutil.copytree(tiny("mixtral"), broken)
        shard = sorted(broken.glob("*.safetensors"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        write_model(triton.repo, "corrupt", broken)
        with pytest.raises(InferenceServerException, match="cannot load the model weights"):
            client.load_model("corrupt")
        assert not client.is_model_ready("corrupt")
        write_model(triton.repo, "badparam", tiny("mixtral"), max_num_seqs="lots")
        with pytest.raises(InferenceServerException, match="'max_num_seqs' must be an integer"):
            client.load_model("badparam")
        assert generate(triton.http_url, "moe_mixtral", "fine", max_tokens=2)["num_output_tokens"] >= 1
    finally:
        client.close()


def _ids(event: dict) -> list[int]:
    value = event["output_token_ids"]  # the generate endpoint sends a one-element array as a bare number
    return value if isinstance(value, list) else [value]


def test_stream_resumed_from_its_token_ids_continues_exactly(triton, tiny, reference):
    """The migration path through Triton: a stream cut after a few responses and resumed (``resume_state``) from
    the token ids it reported yields the reference's remaining text and tokens, nothing repeated or lost."""
    ids, text = reference(tiny("qwen3_moe"), PROMPTS[3], 14)
    events = list(generate_stream(triton.http_url, "moe_qwen3_moe", PROMPTS[3], max_tokens=14))
    assert [t for e in events for t in _ids(e)] == ids
    head = events[:3]
    got_ids = [t for e in head for t in _ids(e)]
    sent = "".join(e["text_output"] for e in head)
    state = json.dumps({"output_token_ids": got_ids, "text_chars_sent": len(sent)})
    rest = list(generate_stream(triton.http_url, "moe_qwen3_moe", PROMPTS[3], inputs={"resume_state": state},
                                max_tokens=14))
    assert sent + "".join(e["text_output"] for e in rest) == text
    assert got_ids + [t for e in rest for t in _ids(e)] == ids
    assert rest[-1]["num_output_tokens"] == len(ids)
    with pytest.raises(GenerateError, match="resume_state"):
        list(generate_stream(triton.http_url, "moe_qwen3_moe", PROMPTS[3], inputs={"resume_state": "[1]"},
                             max_tokens=14))


@pytest.mark.parametrize("arch, budget, eviction, prefetch", [
    ("deepseek_v3", "1", "activation", "activation"),  # bytes too small for one expert: refused at load
    ("qwen3_moe", "7%", "activation", "activation"),   # 1 of 16 experts: one slot, each layer runs in rounds
    ("mixtral", "25%", "lru", "lookahead"),
])
def test_offloaded_model_through_triton(triton, tiny, reference, arch, budget, eviction, prefetch):
    """``expert_cache_budget`` turns offloading on: greedy output still equals transformers, the expert cache's
    counters and the start-up phases reach Prometheus, and a budget too small for one expert fails the load."""
    name = f"offload_{arch}"
    write_model(triton.repo, name, tiny(arch), expert_cache_budget=budget, expert_eviction=eviction,
                expert_prefetch=prefetch)
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300)
    try:
        if budget == "1":
            with pytest.raises(InferenceServerException, match="holds no expert"):
                client.load_model(name)
            return
        client.load_model(name)
        for prompt in PROMPTS[:2]:
            ids, text = reference(tiny(arch), prompt, 10)
            events = list(generate_stream(triton.http_url, name, prompt, max_tokens=10))
            assert "".join(e["text_output"] for e in events) == text
        time.sleep(0.5)  # the metrics thread applies the last snapshot (taken when the batch emptied)
        uses = metric(triton, "tritonmoe_expert_uses_total", model=name)
        hits, misses = (metric(triton, f"tritonmoe_expert_cache_{k}_total", model=name) for k in ("hits", "misses"))
        assert uses > 0 and hits + misses == uses and misses > 0
        assert metric(triton, "tritonmoe_expert_demand_bytes_total", model=name) > 0
        assert 0 <= metric(triton, "tritonmoe_expert_hit_rate", model=name) <= 1
        assert metric(triton, "tritonmoe_startup_seconds", model=name, phase="offload_setup") > 0
        client.unload_model(name)
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["resident", "offloaded", "disk"])
def test_converted_checkpoint_through_triton(triton, tiny, reference, tmp_path, mode):
    """A checkpoint in tritonmoe's loading-optimised format (tritonmoe-convert) serves like its HF original,
    resident, offloaded, and offloaded with the experts' host tier its files on disk (``expert_host_tier: disk``); a
    flipped bit in its data fails the load with the checksum error naming the tensor."""
    from tritonmoe.loader.convert import convert

    converted = convert(tiny("olmoe"), tmp_path / "olmoe-converted", progress=False).dest
    params = {"resident": {}, "offloaded": {"expert_cache_budget": "30%"},
              "disk": {"expert_cache_budget": "30%", "expert_host_tier": "disk"}}[mode]
    name = f"converted_{mode}"
    write_model(triton.repo, name, converted, **params)
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300)
    try:
        client.load_model(name)
        _, text = reference(tiny("olmoe"), PROMPTS[0], 10)
        assert generate(triton.http_url, name, PROMPTS[0], max_tokens=10,
                        exclude_input_in_output=True)["text_output"] == text
        client.unload_model(name)
        if mode == "resident":
            return
        part = sorted(converted.glob("partition-*.bin"))[0]
        data = bytearray(part.read_bytes())
        data[4096 + 17] ^= 0x01
        part.write_bytes(bytes(data))
        write_model(triton.repo, f"converted_bad_{mode}", converted, **params)
        with pytest.raises(InferenceServerException, match="checksum"):
            client.load_model(f"converted_bad_{mode}")
        assert not client.is_model_ready(f"converted_bad_{mode}")
    finally:
        client.close()


def test_offload_trace_file_adds_up_to_the_metrics_and_plots(triton, tiny, reference, tmp_path):
    """``expert_trace_path``: the engine appends one line per step with each MoE layer's expert-cache activity; the
    steps' per-layer sums equal the per-layer counters Prometheus got, the plotting tool draws it and reports the
    same hit rate, and a trace path in a missing folder fails the load naming the parameter."""
    from tritonmoe.backend.offload.trace_file import read_trace
    from tritonmoe.tools.plot_offload_trace import plot

    name, trace = "offload_traced", tmp_path / "trace.jsonl"
    write_model(triton.repo, name, tiny("qwen3_moe"), expert_cache_budget="25%", expert_trace_path=trace)
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300)
    try:
        client.load_model(name)
        tokens = 0
        for prompt in PROMPTS[:2]:
            ids, text = reference(tiny("qwen3_moe"), prompt, 8)
            events = list(generate_stream(triton.http_url, name, prompt, max_tokens=8))
            assert "".join(e["text_output"] for e in events) == text
            tokens += len(ids)
        time.sleep(0.5)  # the metrics thread applies the last snapshot (taken when the batch emptied)
        header, steps = read_trace(trace)
        assert header["eviction"] == "auto" and header["budget"] == "25%"
        # two requests one after the other; a step prefills what it admits and decodes every running sequence
        assert len(steps) >= tokens - 2
        layers = header["layers"]
        for field, metric_name in (("uses", "tritonmoe_expert_uses_total"),
                                   ("hits", "tritonmoe_expert_cache_hits_total"),
                                   ("misses", "tritonmoe_expert_cache_misses_total")):
            from_trace = [sum(s[field][layer] for s in steps) for layer in range(layers)]
            from_metrics = [metric(triton, metric_name, model=name, layer=str(layer)) for layer in range(layers)]
            assert from_trace == from_metrics, field
            assert sum(from_trace) > 0
        totals = plot(str(trace), str(tmp_path / "trace.png"))
        assert (tmp_path / "trace.png").stat().st_size > 10_000
        assert totals["steps"] == len(steps)
        assert totals["hit_rate"] == pytest.approx(metric(triton, "tritonmoe_expert_hit_rate", model=name))
        client.unload_model(name)
        write_model(triton.repo, "offload_bad_trace", tiny("qwen3_moe"), expert_cache_budget="25%",
                    expert_trace_path=tmp_path / "missing" / "trace.jsonl")
        with pytest.raises(InferenceServerException, match="expert_trace_path"):
            client.load_model("offload_bad_trace")
    finally:
        client.close()


def test_sliding_window_model_through_triton_equals_transformers(triton, reference, tmp_path):
    """A GPT-OSS whose layers alternate sliding-window (4 tokens) and full attention, as real GPT-OSS checkpoints
    do: concurrent streams through tritonserver, prompts longer than the window, equal transformers' generate()."""
    from tritonmoe.tools.tiny_models import TinySpec, build

    path = build(TinySpec(arch="gpt_oss", layers=2, experts=4, top_k=2,
                          extra={"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}),
                 tmp_path / "gpt_oss_sliding")
    write_model(triton.repo, "gpt_oss_sliding", path, expert_cache_budget="50%")  # offloaded too
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300)
    try:
        client.load_model("gpt_oss_sliding")
        results = {}

        def run(prompt):
            results[prompt] = "".join(e["text_output"] for e in
                                      generate_stream(triton.http_url, "gpt_oss_sliding", prompt, max_tokens=12))

        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for prompt in PROMPTS:
            assert results[prompt] == reference(path, prompt, 12)[1], prompt
        client.unload_model("gpt_oss_sliding")
    finally:
        client.close()


def test_offloaded_default_policy_under_continuous_batching(triton, tiny, tmp_path):
    """The default offloading (``expert_eviction: auto``: LRU while one sequence runs, activation-aware while
    several do) through Triton with streams that overlap: the trace shows steps of one and of several sequences,
    and every stream equals the same request run alone."""
    from tritonmoe.backend.offload.trace_file import read_trace

    name, trace = "offload_default_batched", tmp_path / "trace.jsonl"
    write_model(triton.repo, name, tiny("qwen3_moe"), expert_cache_budget="25%", expert_trace_path=trace)
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=300)
    results = {}

    def run(key, prompt, n):
        results[key] = "".join(e["text_output"] for e in generate_stream(triton.http_url, name, prompt,
                                                                          max_tokens=n, ignore_eos=True))

    try:
        client.load_model(name)
        alone = {i: generate(triton.http_url, name, PROMPTS[i], max_tokens=12, ignore_eos=True,
                             exclude_input_in_output=True)["text_output"] for i in range(3)}
        first = threading.Thread(target=run, args=(0, PROMPTS[0], 240))  # outlasts a loaded CI box
        first.start()
        time.sleep(0.3)
        others = [threading.Thread(target=run, args=(i, PROMPTS[i], 12)) for i in (1, 2)]
        for t in others:
            t.start()
        for t in [first] + others:
            t.join(120)
        assert results[0].startswith(alone[0]) and results[1] == alone[1] and results[2] == alone[2]
        header, steps = read_trace(trace)
        assert header["eviction"] == "auto"
        running = {s["running"] for s in steps}
        assert 1 in running and max(running) >= 2, running  # both modes ran
        client.unload_model(name)
    finally:
        client.close()
