"""Request validation: sampling keys, the vLLM-compatible inputs, and streaming text with stop strings."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonmoe.backend.protocol import parse_request
from tritonmoe.backend.sampling import RequestError, parse_sampling
from tritonmoe.backend.text import TextStream
from tritonmoe.tools.tiny_models import make_tokenizer

TOK = make_tokenizer(512)


def parse(**kw):
    args = dict(text_input=b"hello", stream=None, sampling_parameters=None, exclude_input_in_output=None,
                request_parameters=None, tokenizer=TOK, max_model_len=64)
    args.update(kw)
    return parse_request(**args)


def test_sampling_defaults_and_coercion():
    p = parse_sampling({"max_tokens": "8", "temperature": "0.5", "top_k": 5.0, "ignore_eos": "true"}, max_model_len=64)
    assert (p.max_tokens, p.temperature, p.top_k, p.ignore_eos) == (8, 0.5, 5, True)
    assert parse_sampling({}, max_model_len=64, default_max_tokens=7).max_tokens == 7
    assert parse_sampling({"stop": "x"}, max_model_len=64).stop == ("x",)


@pytest.mark.parametrize("values, fragment", [
    ({"max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"max_tokens": -3}, "'max_tokens' must be >= 1"),
    ({"max_tokens": 64}, "smaller than the model's context"),
    ({"max_tokens": "many"}, "'max_tokens' must be an integer"),
    ({"max_tokens": True}, "'max_tokens' must be an integer"),
    ({"temperature": -1}, "'temperature' must be a finite number"),
    ({"top_p": 0}, "'top_p' must be in (0, 1]"),
    ({"top_k": -1}, "'top_k' must be >= 0"),
    ({"stop": [""]}, "'stop' must be"),
    ({"stop": 3}, "'stop' must be a string"),
    ({"min_tokens": 9, "max_tokens": 4}, "'min_tokens' must be in"),
    ({"temprature": 1.0}, "unknown sampling parameter(s) 'temprature'"),
])
def test_sampling_errors_name_the_field(values, fragment):
    with pytest.raises(RequestError) as e:
        parse_sampling(values, max_model_len=64)
    assert fragment in str(e.value)


def test_request_inputs():
    r = parse(sampling_parameters=json.dumps({"max_tokens": 3}).encode())
    assert r.params.max_tokens == 3 and r.prepend_prompt and not r.stream
    assert r.prompt_ids == TOK.encode("hello")
    r = parse(stream=True)
    assert r.stream and not r.prepend_prompt
    assert parse(exclude_input_in_output=True).prepend_prompt is False
    r = parse(request_parameters=json.dumps({"max_tokens": 5, "triton_enable_empty_final_response": True,
                                             "priority": 1}))
    assert r.params.max_tokens == 5


@pytest.mark.parametrize("kw, fragment", [
    ({"text_input": None}, "'text_input' is required"),
    ({"text_input": b""}, "'text_input' is empty"),
    ({"text_input": b"\xff\xfe bad"}, "not valid UTF-8"),
    ({"sampling_parameters": b"{not json"}, "'sampling_parameters' is not valid JSON"),
    ({"sampling_parameters": b"[1, 2]"}, "must be a JSON object"),
    ({"request_parameters": json.dumps({"colour": "red"})}, "unknown request parameter(s) 'colour'"),
    ({"request_parameters": json.dumps({"max_tokens": 2}), "sampling_parameters": b'{"max_tokens": 3}'},
     "given both"),
    ({"stream": True, "exclude_input_in_output": False}, "streaming with 'exclude_input_in_output' = false"),
    ({"text_input": ("word " * 80).encode()}, "the model's context is 64"),
])
def test_request_errors_name_the_problem(kw, fragment):
    with pytest.raises(RequestError) as e:
        parse(**kw)
    assert fragment in str(e.value)


def _stream(ids, stop=()):
    s = TextStream(TOK, tuple(stop))
    pieces = [s.push(i) for i in ids]
    if not s.stopped:
        pieces.append(s.finish())
    return pieces, s


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=4, max_value=511), min_size=1, max_size=40))
def test_streamed_pieces_add_up_to_the_full_decode(ids):
    pieces, stream = _stream(ids)
    assert "".join(pieces) == TOK.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefg xyz\n", min_size=1, max_size=60), st.text(alphabet="abcxyz", min_size=1, max_size=4))
def test_stop_string_cuts_output_before_it_and_never_leaks(text, stop):
    ids = TOK.encode(text)
    pieces, stream = _stream(ids, [stop])
    full = TOK.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    out = "".join(pieces)
    if stop in full:
        assert stream.stopped and out == full[: full.index(stop)]
    else:
        assert out == full
    assert stop not in out
