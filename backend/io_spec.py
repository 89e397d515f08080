"""The model's inputs and outputs, compatible with Triton's vLLM backend (imports nothing heavy: Triton's
auto-complete stub reads these before any model instance starts)."""

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
