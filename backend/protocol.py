"""The model's request/response contract, compatible with Triton's vLLM backend.

Inputs ``text_input``, optional ``stream``, ``sampling_parameters`` (JSON) and ``exclude_input_in_output``;
outputs ``text_output`` plus ``num_input_tokens``, ``num_output_tokens`` and ``finish_reason``. This makes
``/v2/models/<m>/generate``, ``generate_stream``, gRPC streaming and ``genai-perf --backend vllm`` work unchanged.
Sampling keys may also come as request parameters (``{"text_input": "...", "parameters": {"max_tokens": 8}}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .io_spec import INPUTS, OUTPUTS  # noqa: F401  (re-exported: the contract lives in one place)
from .sampling import SAMPLING_KEYS, RequestError, SamplingParams, parse_sampling

# Request parameters Triton itself owns (extension_parameters.md): never ours to reject.
_TRITON_PARAMETERS = {"sequence_id", "priority", "timeout", "sequence_start", "sequence_end", "headers"}


@dataclass(frozen=True)
class ParsedRequest:
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    prepend_prompt: bool
    resume_ids: tuple[int, ...] = ()
    text_chars_sent: int = 0


def _json_object(raw: bytes | str, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"'{what}' is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError(f"'{what}' must be a JSON object, got {type(value).__name__}")
    return value


def _resume_state(raw: bytes | str) -> tuple[tuple[int, ...], int]:
    state = _json_object(raw, "resume_state")
    unknown = sorted(set(state) - {"output_token_ids", "text_chars_sent"})
    if unknown:
        raise RequestError(f"unknown resume_state key(s) {', '.join(map(repr, unknown))}; "
                           "accepted: output_token_ids, text_chars_sent")
    ids, sent = state.get("output_token_ids"), state.get("text_chars_sent", 0)
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError("resume_state 'output_token_ids' must be a non-empty list of integers")
    if not isinstance(sent, int) or isinstance(sent, bool) or sent < 0:
        raise RequestError(f"resume_state 'text_chars_sent' must be an integer >= 0, got {sent!r}")
    return tuple(ids), sent


def parse_request(*, text_input: bytes | None, stream: bool | None, sampling_parameters: bytes | None,
                  exclude_input_in_output: bool | None, request_parameters: str | None, tokenizer,
                  max_model_len: int, default_max_tokens: int = 16,
                  resume_state: bytes | None = None) -> ParsedRequest:
    if text_input is None:
        raise RequestError("input 'text_input' is required")
    try:
        prompt = text_input.decode("utf-8") if isinstance(text_input, bytes) else str(text_input)
    except UnicodeDecodeError as e:
        raise RequestError(f"'text_input' is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not prompt:
        raise RequestError("'text_input' is empty")

    sampling = _json_object(sampling_parameters, "sampling_parameters") if sampling_parameters else {}
    extra = _json_object(request_parameters, "parameters") if request_parameters else {}
    extra = {k: v for k, v in extra.items() if k not in _TRITON_PARAMETERS and not k.startswith("triton_")}
    unknown = sorted(set(extra) - SAMPLING_KEYS)
    if unknown:
        raise RequestError(f"unknown request parameter(s) {', '.join(map(repr, unknown))}; "
                           f"sampling keys are: {', '.join(sorted(SAMPLING_KEYS))}")
    twice = sorted(set(extra) & set(sampling))
    if twice:
        raise RequestError(f"sampling parameter(s) {', '.join(map(repr, twice))} given both in "
                           "'sampling_parameters' and as request parameters")
    params = parse_sampling({**sampling, **extra}, max_model_len=max_model_len,
                            default_max_tokens=default_max_tokens)

    stream = bool(stream)
    # vLLM's convention: the prompt is prepended unless excluded; streaming excludes it by default.
    prepend = not exclude_input_in_output if exclude_input_in_output is not None else not stream
    if prepend and stream:
        raise RequestError("streaming with 'exclude_input_in_output' = false is not supported")
    resume_ids, text_chars_sent = _resume_state(resume_state) if resume_state else ((), 0)
    if resume_ids and not stream:
        raise RequestError("'resume_state' continues a stream: it needs 'stream' = true")

    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise RequestError("'text_input' encodes to no tokens")
    if len(prompt_ids) >= max_model_len:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_model_len}")
    return ParsedRequest(prompt=prompt, prompt_ids=prompt_ids, params=params, stream=stream, prepend_prompt=prepend,
                         resume_ids=resume_ids, text_chars_sent=text_chars_sent)
