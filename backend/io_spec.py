"""The model's inputs and outputs, compatible with Triton's vLLM backend (imports nothing heavy: Triton's
auto-complete stub reads these before any model instance starts)."""

import json

INPUTS = [
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "exclude_input_in_output", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    # Live migration (router/): JSON {"output_token_ids": [...], "text_chars_sent": n} continues a stream that
    # another server began; the KV cache is recomputed from the prompt plus those tokens.
    {"name": "resume_state", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
]
OUTPUTS = [
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "num_input_tokens", "data_type": "TYPE_INT32", "dims": [1]},
    {"name": "num_output_tokens", "data_type": "TYPE_INT32", "dims": [1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [1]},
    # Token ids generated since this request's previous response (all of them when not streaming). The generate
    # endpoint's JSON turns a one-element array into a bare number.
    {"name": "output_token_ids", "data_type": "TYPE_INT32", "dims": [-1]},
]


def complete_config(config: dict) -> dict:
    """``config`` with everything ``auto_complete_config`` would add (the vLLM-style I/O, ``max_batch_size`` 0, the
    decoupled policy). A server started with ``--disable-auto-complete-config`` then starts no extra stub process
    per load just to complete the configuration (about 1.3 s of every load on the CPU machine); a server that
    auto-completes finds nothing to add."""
    config = json.loads(json.dumps(config))
    config.setdefault("backend", "python")
    config["max_batch_size"] = 0
    config["model_transaction_policy"] = {"decoupled": True}
    have = {i["name"] for i in config.get("input", [])}
    config["input"] = config.get("input", []) + [dict(i) for i in INPUTS if i["name"] not in have]
    have = {o["name"] for o in config.get("output", [])}
    config["output"] = config.get("output", []) + [dict(o) for o in OUTPUTS if o["name"] not in have]
    return config
