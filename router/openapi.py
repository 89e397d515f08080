"""The router's OpenAPI 3.0 description, served at ``/openapi.json``."""

from __future__ import annotations

_SAMPLING = {"max_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0},
             "top_p": {"type": "number"}, "top_k": {"type": "integer"}, "seed": {"type": "integer"},
             "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
             "min_tokens": {"type": "integer"}, "ignore_eos": {"type": "boolean"}}
_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _op(summary, body=None, ok="OK", sse=False, params=None):
    op = {"summary": summary, "responses": {"200": {"description": ok, "content": {
        "text/event-stream" if sse else "application/json": {"schema": {"type": "object"}}}},
        "400": _ERR, "401": _ERR, "404": _ERR, "502": _ERR, "503": _ERR}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    return op


def spec() -> dict:
    generate = {"type": "object", "required": ["text_input"], "properties": {
        "text_input": {"type": "string"}, "stream": {"type": "boolean"}, "exclude_input_in_output": {"type": "boolean"},
        "sampling_parameters": {"type": "string", "description": "JSON object of sampling keys"},
        "parameters": {"type": "object", "properties": _SAMPLING}}}
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": {"type": "string"}, "prompt": {"type": "string"}, "stream": {"type": "boolean"},
        "n": {"type": "integer", "enum": [1]}, **_SAMPLING}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string"}, "stream": {"type": "boolean"}, "messages": {"type": "array", "items": {
            "type": "object", "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                                             "content": {"type": "string"}}}}, **_SAMPLING}}
    deploy = {"type": "object", "required": ["name", "checkpoint"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
        "checkpoint": {"type": "string", "description": "absolute path, or a model name registered at the loaders"},
        "parameters": {"type": "object"}, "min_instances": {"type": "integer"}, "max_instances": {"type": "integer"},
        "target_concurrency": {"type": "integer"}, "keep_alive_s": {"type": "number"}, "use_loader": {"type": "boolean"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "tritonmoe router", "version": "0.1.0",
                 "description": "Front door over several Triton servers: locality-aware placement, scale to zero, "
                                "live migration. Send 'Authorization: Bearer <token>' when the router has a token."},
        "components": {"schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": _op("liveness (no token needed)")},
            "/metrics": {"get": _op("Prometheus metrics")},
            "/v1/models": {"get": _op("deployed models (OpenAI list)")},
            "/v1/completions": {"post": _op("OpenAI completion; SSE when stream is true", completion)},
            "/v1/chat/completions": {"post": _op("OpenAI chat completion; SSE when stream is true", chat)},
            "/v2/models/{model}/generate": {"post": _op("Triton generate", generate, params=["model"])},
            "/v2/models/{model}/generate_stream": {"post": _op("Triton generate_stream (SSE)", generate, sse=True,
                                                               params=["model"])},
            "/admin/hosts": {"get": _op("hosts, instances, start-up model, cold starts")},
            "/admin/models": {"get": _op("deployed models"), "post": _op("deploy (register) a model", deploy)},
            "/admin/models/{model}": {"delete": _op("delete a model (unloads it everywhere)", params=["model"])},
            "/admin/requests": {"get": _op("running requests")},
            "/admin/requests/{rid}/migrate": {"post": _op("live-migrate a running request",
                                                          {"type": "object", "properties": {"host": {"type": "string"},
                                                                                         "at_token": {"type": "integer"}}},
                                                          params=["rid"])},
            "/admin/hosts/{host}/drain": {"post": _op("migrate every request off a host", params=["host"])},
        },
    }
