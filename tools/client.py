"""A minimal client for Triton's generate extension (tritonclient 2.51 has no generate helper)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Iterator


class GenerateError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _post(url: str, body: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = json.loads(text).get("error", text)
        except json.JSONDecodeError:
            pass
        raise GenerateError(e.code, text) from None


def generate(http_url: str, model: str, prompt: str, timeout: float = 300, **parameters) -> dict:
    """One completion through ``/v2/models/<model>/generate``."""
    body = {"text_input": prompt, "parameters": parameters}
    with _post(f"http://{http_url}/v2/models/{model}/generate", body, timeout) as r:
        return json.loads(r.read())


def generate_stream(http_url: str, model: str, prompt: str, timeout: float = 300, inputs: dict | None = None,
                    **parameters) -> Iterator[dict]:
    """Server-sent events of ``/v2/models/<model>/generate_stream``, one dict per response. ``inputs`` adds
    model inputs beside ``text_input`` (``resume_state``, ...)."""
    body = {"text_input": prompt, "stream": True, **(inputs or {}), "parameters": parameters}
    with _post(f"http://{http_url}/v2/models/{model}/generate_stream", body, timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise GenerateError(200, event["error"])
                yield event


def load_model(http_url: str, model: str, config: dict | None = None, timeout: float = 600,
               files: dict[str, bytes] | None = None) -> None:
    """Triton's repository API ``load``, optionally with a ``config`` override (the full model config as JSON)
    and ``files`` (``{"1/model.py": b"..."}``) that make up a model folder the repository does not have."""
    import base64

    body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
    for name, data in (files or {}).items():
        body["parameters"][f"file:{name}"] = base64.b64encode(data).decode()
    with _post(f"http://{http_url}/v2/repository/models/{model}/load", body, timeout) as r:
        r.read()


def unload_model(http_url: str, model: str, timeout: float = 60) -> None:
    with _post(f"http://{http_url}/v2/repository/models/{model}/unload", {}, timeout) as r:
        r.read()
