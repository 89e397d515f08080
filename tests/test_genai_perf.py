"""genai-perf, as users run it, against a real tritonserver serving a tritonmoe model (vLLM-compatible I/O)."""

from __future__ import annotations

import pytest

from tritonmoe.tools import genai_perf


@pytest.mark.e2e
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "non-streaming"])
def test_genai_perf_profiles_a_served_model(triton, tiny, tmp_path, streaming):
    requests, input_tokens, output_tokens = 12, 24, 8
    summary, raw = genai_perf.profile("moe_mixtral", triton.grpc_url, tiny("mixtral"), tmp_path / "artifacts",
                                      input_tokens=input_tokens, output_tokens=output_tokens, requests=requests,
                                      concurrency=3, streaming=streaming, timeout=400)

    assert summary["request_count"]["avg"] == requests
    assert summary["request_throughput"]["avg"] > 0
    assert summary["input_sequence_length"]["avg"] == input_tokens  # its tokenizer and ours agree on the prompt
    if streaming:
        assert summary["time_to_first_token"]["avg"] > 0

    done = raw["experiments"][0]["requests"]
    assert len(done) >= requests
    for request in done:
        outputs = request["response_outputs"]
        assert outputs, "a request came back without a response"
        # every response carries the ids of the text it adds; the counter is cumulative and ends at max_tokens
        ids = [t for out in outputs for t in _as_list(out.get("output_token_ids"))]
        final = outputs[-1]
        assert final["finish_reason"] in ("length", "stop")
        assert int(final["num_output_tokens"]) == len(ids) <= output_tokens
        assert int(final["num_input_tokens"]) == input_tokens


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def test_genai_perf_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONMOE_GENAI_PERF", str(tmp_path / "nowhere"))
    with pytest.raises(genai_perf.TritonError, match="genai-perf is not installed in .*scripts/dev.sh install"):
        genai_perf.env()
