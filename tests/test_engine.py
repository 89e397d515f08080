"""The engine on its own (no Triton): continuous batching equals transformers, sampling, stops, cancellation."""

import queue

import pytest
import torch

from conftest import ARCHS, PROMPTS, _hf
from tritonmoe.backend.engine import Engine
from tritonmoe.backend.sampling import RequestError, parse_sampling


def drain(q):
    outs = []
    while not q.empty():
        outs.append(q.get())
    return outs


def run_all(engine):
    while engine.num_running or engine._pending:
        engine.step()


def submit(engine, prompt, **sampling):
    q = queue.Queue()
    params = parse_sampling(sampling, max_model_len=engine.max_model_len)
    seq_id = engine.submit(engine.tokenizer.encode(prompt), params, q.put)
    return seq_id, q


@pytest.mark.parametrize("arch", ARCHS)
def test_continuous_batching_matches_transformers_generate(arch, tiny, reference):
    """Requests join a running batch one step apart, more than fit at once; each equals its solo generate()."""
    path = tiny(arch)
    model, tok = _hf(path)
    engine = Engine(model, tok, max_num_seqs=3)
    streams = []
    for prompt in PROMPTS:
        streams.append(submit(engine, prompt, max_tokens=16)[1])
        engine.step()
        assert engine.num_running <= 3
    run_all(engine)
    for prompt, q in zip(PROMPTS, streams):
        outs = drain(q)
        ids, text = reference(path, prompt, 16)
        assert "".join(o.text for o in outs) == text
        assert outs[-1].finished and outs[-1].output_tokens == len(ids)
        assert outs[-1].finish_reason == ("stop" if ids[-1] in engine.eos_ids else "length")
        assert [o.finished for o in outs].count(True) == 1


def test_second_request_joins_at_the_next_step(tiny):
    model, tok = _hf(tiny("mixtral"))
    engine = Engine(model, tok, max_num_seqs=4)
    _, first = submit(engine, PROMPTS[0], max_tokens=30, ignore_eos=True)
    engine.step()
    engine.step()
    _, second = submit(engine, PROMPTS[1], max_tokens=5, ignore_eos=True)
    engine.step()
    assert engine.num_running == 2, "the second request must join the running batch, not wait"
    run_all(engine)
    assert drain(second)[-1].output_tokens == 5 and drain(first)[-1].output_tokens == 30


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    model, tok = _hf(tiny("qwen3_moe"))
    solo = Engine(model, tok)
    _, q = submit(solo, PROMPTS[0], max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    run_all(solo)
    alone = "".join(o.text for o in drain(q))
    busy = Engine(model, tok)
    others = [submit(busy, p, max_tokens=20, temperature=1.3) for p in PROMPTS[1:]]
    busy.step()
    _, q = submit(busy, PROMPTS[0], max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    run_all(busy)
    assert "".join(o.text for o in drain(q)) == alone
    _, q = submit(busy, PROMPTS[0], max_tokens=20, temperature=1.0, seed=8)
    run_all(busy)
    assert "".join(o.text for o in drain(q)) != alone, "a different seed should change a 20-token sample"
    assert all(drain(q2)[-1].finished for _, q2 in others)


def test_stop_string_and_min_tokens(tiny, reference):
    path = tiny("mixtral")
    model, tok = _hf(path)
    _, text = reference(path, PROMPTS[0], 16)
    stop = text[5:8]
    engine = Engine(model, tok)
    _, q = submit(engine, PROMPTS[0], max_tokens=16, stop=[stop])
    run_all(engine)
    outs = drain(q)
    assert "".join(o.text for o in outs) == text[: text.index(stop)]
    assert outs[-1].finish_reason == "stop"
    _, q = submit(engine, PROMPTS[2], max_tokens=12, min_tokens=12)
    run_all(engine)
    assert drain(q)[-1].output_tokens == 12


def test_cancel_frees_the_sequence_at_the_next_step(tiny):
    model, tok = _hf(tiny("olmoe"))
    engine = Engine(model, tok)
    seq_id, q = submit(engine, PROMPTS[0], max_tokens=100, ignore_eos=True)
    _, other = submit(engine, PROMPTS[1], max_tokens=10, ignore_eos=True)
    engine.step()
    engine.cancel(seq_id)
    engine.step()
    assert engine.num_running == 1
    outs = drain(q)
    assert outs[-1].finished and outs[-1].finish_reason == "cancelled" and outs[-1].output_tokens < 100
    run_all(engine)
    assert drain(other)[-1].output_tokens == 10


def test_context_limit_and_bad_prompts(tiny):
    model, tok = _hf(tiny("mixtral"))
    engine = Engine(model, tok, max_model_len=24)
    ids = tok.encode(PROMPTS[0])
    q = queue.Queue()
    engine.submit(ids, parse_sampling({"max_tokens": 20, "ignore_eos": True}, max_model_len=24), q.put)
    run_all(engine)
    last = drain(q)[-1]
    assert last.finish_reason == "length" and last.prompt_tokens + last.output_tokens == 24
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], parse_sampling({}, max_model_len=24), q.put)
    with pytest.raises(RequestError, match="context is 24"):
        engine.submit([5] * 24, parse_sampling({}, max_model_len=24), q.put)


def test_a_failing_step_errors_its_requests_and_the_engine_goes_on(tiny, monkeypatch):
    model, tok = _hf(tiny("mixtral"))
    engine = Engine(model, tok)
    _, q = submit(engine, PROMPTS[0], max_tokens=10, ignore_eos=True)
    engine.step()
    real = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("boom")))
    engine.step()
    last = drain(q)[-1]
    assert last.finished and last.finish_reason == "error" and "boom" in last.error
    monkeypatch.setattr(engine, "_forward", real)
    _, q = submit(engine, PROMPTS[1], max_tokens=4, ignore_eos=True)
    run_all(engine)
    assert drain(q)[-1].output_tokens == 4


def test_engine_thread_and_shutdown(tiny):
    model, tok = _hf(tiny("mixtral"))
    engine = Engine(model, tok).start()
    outs = list(engine.generate(PROMPTS[0], parse_sampling({"max_tokens": 6, "ignore_eos": True}, max_model_len=512)))
    assert outs[-1].finished and outs[-1].output_tokens == 6 and outs[0].ttft is not None
    _, q = submit(engine, PROMPTS[1], max_tokens=400, ignore_eos=True)
    engine.shutdown()
    last = drain(q)[-1]
    assert last.finished and last.finish_reason in ("error", "length")
    with pytest.raises(RuntimeError, match="shutting down"):
        submit(engine, PROMPTS[1], max_tokens=4)


def _migrate(engine_a, engine_b, prompt, cut, **sampling):
    """Run ``prompt`` on engine A for ``cut`` outputs, then continue it on engine B from the tokens A produced."""
    params = parse_sampling(sampling, max_model_len=engine_a.max_model_len)
    prompt_ids = engine_a.tokenizer.encode(prompt)
    qa = queue.Queue()
    seq = engine_a.submit(prompt_ids, params, qa.put)
    got = []
    while len(got) < cut:
        engine_a.step()
        got += drain(qa)
    engine_a.cancel(seq)
    engine_a.step()
    assert not got[-1].finished
    ids = [t for o in got for t in o.token_ids]
    sent = "".join(o.text for o in got)
    qb = queue.Queue()
    engine_b.submit(prompt_ids, params, qb.put, resume_ids=ids, text_chars_sent=len(sent))
    run_all(engine_b)
    rest = drain(qb)
    return sent + "".join(o.text for o in rest), ids + [t for o in rest for t in o.token_ids], rest[-1]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_resumed_stream_continues_exactly(tiny, sampling):
    """Live migration's contract: a stream cut after k tokens and resumed elsewhere from its token ids produces
    the same text and tokens, without repeating or losing a character, as one never interrupted."""
    model, tok = _hf(tiny("qwen3_moe"))
    a, b, whole = (Engine(model, tok, max_num_seqs=2) for _ in range(3))
    _, q = submit(whole, PROMPTS[2], max_tokens=20, ignore_eos=True, **sampling)
    run_all(whole)
    outs = drain(q)
    text, ids = "".join(o.text for o in outs), [t for o in outs for t in o.token_ids]
    for cut in (1, 7):
        migrated_text, migrated_ids, last = _migrate(a, b, PROMPTS[2], cut, max_tokens=20, ignore_eos=True,
                                                     **sampling)
        assert migrated_ids == ids and len(ids) == 20
        assert migrated_text == text
        assert last.output_tokens == 20 and last.finish_reason == "length"


def test_bad_resume_state_is_refused(tiny):
    model, tok = _hf(tiny("mixtral"))
    engine = Engine(model, tok, max_num_seqs=2)
    params = parse_sampling({"max_tokens": 4}, max_model_len=engine.max_model_len)
    ids = tok.encode(PROMPTS[0])
    with pytest.raises(RequestError, match="max_tokens"):
        engine.submit(ids, params, print, resume_ids=[5, 6, 7, 8])
    with pytest.raises(RequestError, match="vocabulary"):
        engine.submit(ids, params, print, resume_ids=[10**9])
    with pytest.raises(RequestError, match="characters were sent"):
        engine.submit(ids, params, print, resume_ids=[5], text_chars_sent=1000)


SLIDING = {  # architecture, window and layer layout of tiny models with sliding-window attention
    "gpt_oss_w4": ("gpt_oss", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}),
    "gpt_oss_w16": ("gpt_oss", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}),
    "mixtral_w5": ("mixtral", {"sliding_window": 5}),  # every layer sliding, as Mistral-style windows are
}


@pytest.mark.parametrize("name", SLIDING)
def test_continuous_batching_with_sliding_window_layers_matches_generate(name, tmp_path):
    """Sliding-window layers keep only their last window - 1 columns: rows of different lengths, longer and
    shorter than the window, join and leave the running batch (merge, trim) and each still equals its solo
    generate()."""
    from transformers import AutoModelForCausalLM

    from tritonmoe.tools.tiny_models import TinySpec, build

    arch, extra = SLIDING[name]
    path = build(TinySpec(arch=arch, layers=2, experts=4, top_k=2, extra=extra), tmp_path / name)
    model, tok = _hf(path)
    engine = Engine(model, tok, max_num_seqs=3)
    prompts = PROMPTS + ["x", "def f(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p):\n    return a"]
    budgets = [12, 5, 9, 3, 7, 10]  # rows finish at different steps: the batch is trimmed under the others
    streams = []
    for prompt, n in zip(prompts, budgets):
        streams.append(submit(engine, prompt, max_tokens=n, ignore_eos=True)[1])
        engine.step()
    run_all(engine)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, n, q in zip(prompts, budgets, streams):
        got = [t for o in drain(q) for t in o.token_ids]
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
        assert got == want.tolist(), (name, prompt)


def test_a_cache_the_batch_cannot_hold_is_refused_before_any_request():
    """A model whose cache has a layer type the running batch does not know fails when the engine is made -- a
    Triton load then fails with this message -- not on every request."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from tritonmoe.backend import kv_batch

    class ChunkedLayer(DynamicLayer):  # stands for chunked / quantized / indexed attention layers
        pass

    cache = DynamicCache()
    cache.layers = [DynamicLayer(), ChunkedLayer()]
    with pytest.raises(kv_batch.UnsupportedCacheError, match="ChunkedLayer"):
        kv_batch._check_layers(cache)
