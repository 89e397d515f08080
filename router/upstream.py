"""Talking to one Triton server: streaming generation over gRPC (aio), loads and unloads through the repository
API, and the classification of what went wrong (the request's fault, the server's, or a dead Python stub).

gRPC rather than HTTP because closing the stream cancels the request on the server (the backend frees the
sequence at its next step), which migration and failover rely on.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np

try:  # tritonclient.grpc parses JSON with python-rapidjson (json.loads only); machines without it (the lent
    import rapidjson  # noqa: F401  GPU machine) get the standard library's json under that name
except ImportError:
    import sys

    sys.modules["rapidjson"] = json
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as agrpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tritonmoe.backend.io_spec import complete_config  # noqa: E402

# The model folder's code: the same two-line shim as model_repository/tiny_moe, sent with each load as a file
# override so the servers need no model folder written by the router (no shared filesystem).
SHIM = (Path(__file__).resolve().parent.parent / "model_repository" / "tiny_moe" / "1" / "model.py")
SHIM_BYTES = (SHIM.read_bytes() if SHIM.exists() else
              b"from tritonmoe.backend.triton_model import TritonPythonModel  # noqa: F401\n")


class UpstreamError(Exception):
    """kind: 'request' (the client's fault: 400), 'server' (host down, hung or unreachable: fail over),
    'stub' (the model's Python stub died: reload, fail over), 'model' (not loaded there: fail over)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def classify(err: Exception) -> UpstreamError:
    if isinstance(err, UpstreamError):
        return err
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        code = err.code()
        msg = f"{code.name}: {err.details()}"
        if code in (grpc.StatusCode.INVALID_ARGUMENT,):
            return UpstreamError("request", msg)
        if code == grpc.StatusCode.NOT_FOUND:
            return UpstreamError("model", msg)
        return UpstreamError("server", msg)
    msg = str(err)
    status = err.status() if isinstance(err, InferenceServerException) else None
    if "Stub process" in msg and "not healthy" in msg:
        return UpstreamError("stub", msg)
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                  "StatusCode.UNKNOWN", "StatusCode.INTERNAL") and "Request for unknown model" not in msg:
        # INTERNAL also covers 'Socket closed' / broken streams of a killed server
        if status != "StatusCode.INTERNAL" or "ocket" in msg or "closed" in msg.lower():
            return UpstreamError("server", msg)
    if "unknown model" in msg.lower() or "is not ready" in msg or "not found" in msg.lower():
        return UpstreamError("model", msg)
    if isinstance(err, (OSError, asyncio.TimeoutError, ConnectionError)):
        return UpstreamError("server", msg or type(err).__name__)
    return UpstreamError("request", msg)


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    final: bool


def _input(name: str, value, dtype: str):
    t = grpcclient.InferInput(name, [1], dtype)
    t.set_data_from_numpy(value)
    return t


def build_inputs(prompt: str, sampling: dict, resume: dict | None):
    inputs = [_input("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
              _input("stream", np.array([True], dtype=bool), "BOOL"),
              _input("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES"),
              _input("exclude_input_in_output", np.array([True], dtype=bool), "BOOL")]
    if resume is not None:
        inputs.append(_input("resume_state", np.array([json.dumps(resume).encode()], dtype=np.object_), "BYTES"))
    return inputs


def _scalar(result, name, default):
    v = result.as_numpy(name)
    if v is None or v.size == 0:
        return default
    return v.reshape(-1)[0]


async def stream_generate(client: agrpc.InferenceServerClient, model: str, prompt: str, sampling: dict,
                          resume: dict | None, request_id: str) -> AsyncIterator[Chunk]:
    """Responses of one streaming request. Raises UpstreamError. Closing the generator cancels the request."""

    async def requests():
        yield {"model_name": model, "inputs": build_inputs(prompt, sampling, resume), "request_id": request_id}

    it = client.stream_infer(requests())
    finished = False
    try:
        async for result, error in it:
            if error is not None:
                raise classify(error)
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param
            finished = finished or final  # before the yield: a consumer may stop at the final chunk
            text = _scalar(result, "text_output", b"")
            ids = result.as_numpy("output_token_ids")
            fin = _scalar(result, "finish_reason", b"")
            yield Chunk(token_ids=[] if ids is None else [int(x) for x in ids.reshape(-1)],
                        text=text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text),
                        finish_reason=fin.decode() if isinstance(fin, bytes) else str(fin),
                        num_input_tokens=int(_scalar(result, "num_input_tokens", 0)),
                        num_output_tokens=int(_scalar(result, "num_output_tokens", 0)), final=final)
            if final:
                return
        raise UpstreamError("server", "the server closed the stream before the final response")
    except (InferenceServerException, grpc.RpcError, OSError, ConnectionError) as e:
        raise classify(e) from None
    finally:
        # Cancel only a request that is still running (the caller stopped early). Cancelling the call after its
        # final response races Triton 2.51's own end of the request: now and then the request is never released,
        # and a later unload of the model never finishes (its stub lives on; reproduced in ~1 of 12 load/
        # stream/unload cycles). After the final response the call ends by itself.
        cancel = None if finished else getattr(it, "cancel", None)
        if cancel is not None:
            try:
                cancel()
            except Exception:  # noqa: BLE001 - already finished
                pass


async def probe(client: agrpc.InferenceServerClient, model: str, timeout: float) -> UpstreamError | None:
    """One-token request: None when the instance answers. Triton 2.51 neither restarts nor reports a dead stub
    (the model stays READY; requests in flight on it just stop), so this is how the router finds out."""
    async def one():
        async for _ in stream_generate(client, model, "ping", {"max_tokens": 1}, None, "probe"):
            pass

    try:
        await asyncio.wait_for(one(), timeout)
    except asyncio.TimeoutError:
        return UpstreamError("hung", f"{model} did not answer a one-token probe in {timeout:.0f}s")
    except UpstreamError as e:
        return e
    return None


def model_config(name: str, checkpoint: str, parameters: dict[str, str], loader_url: str | None = None,
                 instance_group: dict | None = None) -> dict:
    params = {"checkpoint": checkpoint, **parameters}
    if loader_url:
        params["loader_url"] = loader_url
    # complete (I/O, decoupled, max_batch_size): a server started with --disable-auto-complete-config then starts
    # no extra stub per load just to fill them in (~1.25 s of each cold start on the CPU machine)
    return complete_config({"name": name, "backend": "python",
                            "instance_group": [instance_group or {"count": 1, "kind": "KIND_CPU"}],
                            "parameters": {k: {"string_value": str(v)} for k, v in params.items()}})


async def load(client: agrpc.InferenceServerClient, name: str, config: dict, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.load_model(name, config=json.dumps(config),
                                                 files={"file:1/model.py": SHIM_BYTES}), timeout)
    except asyncio.TimeoutError:
        raise UpstreamError("server", f"loading {name!r} took longer than {timeout:.0f}s") from None
    except (InferenceServerException, grpc.RpcError) as e:
        err = classify(e)
        raise UpstreamError("server" if err.kind == "server" else "load", str(e)) from None


async def unload(client: agrpc.InferenceServerClient, name: str, timeout: float = 30.0) -> None:
    try:
        await asyncio.wait_for(client.unload_model(name), timeout)
    except (InferenceServerException, grpc.RpcError, asyncio.TimeoutError, OSError) as e:
        raise classify(e) from None
