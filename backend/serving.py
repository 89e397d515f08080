"""A served model inside Triton's Python backend: request reading, the sender thread, cancellation, metrics.

This module imports neither torch nor transformers. The engine runs either

- in this process (the default): :class:`_LocalEngine` imports :mod:`tritonmoe.backend.engine_worker` (torch,
  transformers) and runs an :class:`~tritonmoe.backend.engine_worker.EngineHost` here, as before; or
- in a warm worker of the engine pool (config parameter ``engine_pool``, :mod:`tritonmoe.backend.engine_pool`):
  :class:`_RemoteEngine` claims a worker that already imported torch and transformers and created its CUDA
  context, sends it the model's parameters, and relays requests and outputs. This stub then never imports torch,
  which is most of a cold model load.

Either way ``execute`` only reads requests and hands them to the engine; a sender thread streams responses back
(each ``send`` is a blocking IPC round trip) and notices cancelled requests; Prometheus metrics are updated by the
metrics thread of :class:`~tritonmoe.backend.metrics.TritonMetrics`. :mod:`tritonmoe.backend.triton_model` (what
``model.py`` re-exports) creates one :class:`ServedModel` per model instance.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

from .config import engine_pool_socket, parameters_from_model_config, parse_bool
from .metrics import OffloadMetrics, TritonMetrics

CANCEL_CHECK_SECONDS = 0.1  # is_cancelled() is an IPC call: poll each request at most this often
INPUT_NAMES = ("text_input", "stream", "sampling_parameters", "exclude_input_in_output", "resume_state")


class BadRequest(ValueError):
    """The request is malformed (sent back as INVALID_ARG)."""


class Unavailable(RuntimeError):
    """The engine cannot take requests: shutting down, or its worker is gone (sent back as UNAVAILABLE)."""


class _TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(msg)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(msg)
        else:
            pb_utils.Logger.log_info(msg)


log = logging.getLogger("tritonmoe")


@dataclass
class _Stream:
    """What the sender thread keeps per request (never the request object: Triton frees it after execute)."""

    sender: object
    stream: bool = False  # these three are filled in once the engine side has parsed the request
    prepend_prompt: bool = False
    prompt: str = ""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # not yet sent (streaming) or all (non-streaming)
    next_cancel_check: float = 0.0

    def started(self, info: tuple) -> None:
        self.stream, self.prepend_prompt, self.prompt = info


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise BadRequest(f"input '{name}' must hold exactly one element, got {values.size}")
    value = values[0]
    return value.item() if isinstance(value, np.generic) else value  # plain Python: it may cross a socket


def _response(text: str, out, token_ids: list[int]) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([out.prompt_tokens], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.array([out.output_tokens], dtype=np.int32)),
        pb_utils.Tensor("finish_reason", np.array([(out.finish_reason or "").encode()], dtype=np.object_)),
        pb_utils.Tensor("output_token_ids", np.array(token_ids, dtype=np.int32)),
    ])


def _error(message: str, code=None) -> "pb_utils.InferenceResponse":
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def device_spec(args: dict) -> str:
    """The instance's device without torch: ``cuda:N`` (KIND_GPU), ``auto`` (KIND_MODEL: GPU 0 if any) or ``cpu``."""
    kind = args.get("model_instance_kind", "CPU")
    if kind == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return "auto" if kind == "MODEL" else "cpu"


class ServedModel:
    def initialize(self, args: dict) -> None:
        handler = _TritonLogHandler()
        handler.setFormatter(logging.Formatter("[tritonmoe] %(message)s"))
        log.handlers[:] = [handler]
        log.setLevel(logging.INFO)
        log.propagate = False

        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("tritonmoe models must be decoupled (model_transaction_policy)")
        self.name, self.version = args["model_name"], args["model_version"]
        params = parameters_from_model_config(model_config)
        pool = engine_pool_socket(params)
        report_metrics = parse_bool("report_metrics", params.get("report_metrics", "true"))
        self.metrics = self._metrics() if report_metrics else None
        self.offload_metrics = None
        try:
            if pool:
                self.engine = _RemoteEngine(self, args, params, pool)
            else:
                self.engine = _LocalEngine(self, args, params)
        except BaseException:
            if self.metrics:
                self.metrics.close()
            raise
        if self.metrics:
            self.metrics.startup(self.engine.phases)
            if self.engine.offload_layers:
                self.offload_metrics = OffloadMetrics(self.metrics, self.engine.offload_layers)
        self._outbox: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="tritonmoe-sender", daemon=True)
        self._sender.start()
        log.info(f"model '{self.name}' ready {self.engine.summary} (numpy {np.__version__} from {np.__file__})")

    def _metrics(self) -> TritonMetrics | None:
        try:
            return TritonMetrics(pb_utils, self.name, self.version)
        except pb_utils.TritonModelException as e:
            if "metrics not supported" in str(e):  # the server runs with --allow-metrics=false
                return None
            raise

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {name: _input(request, name) for name in INPUT_NAMES}
                inputs["parameters"] = request.parameters()
                stream = _Stream(sender)
                self.engine.submit(f"{request.request_id() or 'req'}-{id(stream):x}", inputs, stream)
            except BadRequest as e:
                sender.send(_error(str(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                if self.metrics:
                    self.metrics.request_finished("invalid")
            except Unavailable as e:  # engine shutting down, or its worker is gone
                sender.send(_error(str(e), pb_utils.TritonError.UNAVAILABLE),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as e:  # a bug ends this request (with its final response), not the whole batch
                log.exception(f"submitting {request.request_id() or 'a request'} failed")
                sender.send(_error(f"{type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def deliver(self, stream: _Stream, out) -> None:
        """An engine output for ``stream`` (any thread): the sender thread sends it."""
        self._outbox.put((stream, out))

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            stream, out = item
            try:
                self._send(stream, out)
            except Exception:  # a client gone mid-send must not stop the other streams
                log.exception(f"sending a response for {out.seq_id} failed")
                if not out.finished:
                    self.engine.cancel(out.seq_id)
            if self.metrics:
                self._record(out)

    def _send(self, stream: _Stream, out) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if out.error:
            code = {"invalid": pb_utils.TritonError.INVALID_ARG,
                    "unavailable": pb_utils.TritonError.UNAVAILABLE}.get(out.finish_reason,
                                                                         pb_utils.TritonError.INTERNAL)
            stream.sender.send(_error(out.error, code), flags=final)
        elif out.finish_reason == "cancelled":
            stream.sender.send(_error("request cancelled", pb_utils.TritonError.CANCELLED), flags=final)
        elif stream.stream:
            stream.token_ids.extend(out.token_ids)
            if out.text or out.finished:
                # token ids ride along with the next text: a response never reports text its ids do not explain
                stream.sender.send(_response(out.text, out, stream.token_ids), flags=final if out.finished else 0)
                stream.token_ids = []
        else:
            stream.text.append(out.text)
            stream.token_ids.extend(out.token_ids)
            if out.finished:
                text = "".join(([stream.prompt] if stream.prepend_prompt else []) + stream.text)
                stream.sender.send(_response(text, out, stream.token_ids), flags=final)
        now = time.monotonic()
        if not out.finished and now >= stream.next_cancel_check:
            stream.next_cancel_check = now + CANCEL_CHECK_SECONDS
            if stream.sender.is_cancelled():
                log.info(f"request {out.seq_id} cancelled by the client")
                self.engine.cancel(out.seq_id)

    def _record(self, out) -> None:
        m = self.metrics
        if out.ttft is not None:
            m.update(m.ttft.observe, out.ttft)
            m.update(m.prompt_tokens.increment, out.prompt_tokens)
        if out.itl is not None:
            m.update(m.itl.observe, out.itl)
        if out.ttft is not None or out.itl is not None:
            m.update(m.generated_tokens.increment, 1)
        if out.finished:
            m.request_finished(out.finish_reason or "error")

    def on_step(self, running: int, seconds: float, offload_stats: dict | None) -> None:
        """After an engine step (the engine thread, or the remote engine's reader thread)."""
        if self.metrics:
            self.metrics.update(self.metrics.batch.set, running)
            self.metrics.update(self.metrics.step_seconds.observe, seconds)
        if offload_stats is not None and self.offload_metrics:
            self.offload_metrics.publish(offload_stats)

    def finalize(self) -> None:
        self.engine.close()  # open requests end with an error, delivered before this returns
        self._outbox.put(None)
        self._sender.join(30)
        if self.metrics:
            self.metrics.close()
        self.engine = None
        gc.collect()


class _LocalEngine:
    """The engine in this process (imports torch and transformers here)."""

    def __init__(self, served: ServedModel, args: dict, params: dict[str, str]):
        from .config import EngineConfig
        from .engine_worker import EngineHost, resolve_device
        from .sampling import RequestError

        self._request_error = RequestError
        self.served = served
        cfg = EngineConfig.from_parameters(params, args["model_repository"])
        self.host = EngineHost(cfg, resolve_device(device_spec(args)),
                               on_step=served.on_step if served.metrics else None)
        info = self.host.info()
        self.phases, self.offload_layers, self.summary = info["phases"], info["offload_layers"], info["summary"]

    def submit(self, seq_id: str, inputs: dict, stream: _Stream) -> None:
        deliver = self.served.deliver

        def start(info: tuple):
            stream.started(info)
            return lambda out: deliver(stream, out)

        try:
            self.host.submit(seq_id, inputs, start)
        except self._request_error as e:
            raise BadRequest(str(e)) from None
        except RuntimeError as e:  # engine shutting down
            raise Unavailable(str(e)) from None

    def cancel(self, seq_id: str) -> None:
        self.host.cancel(seq_id)

    def close(self) -> None:
        self.host.close()


class _RemoteEngine:
    """The engine in a warm worker of the engine pool, over a Unix socket (see engine_worker's docstring)."""

    def __init__(self, served: ServedModel, args: dict, params: dict[str, str], pool: str):
        from .engine_pool import PoolError, claim_worker, from_wire

        self.served, self._from_wire = served, from_wire
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._dead: str | None = None
        self._closing = False
        device = device_spec(args)
        t = time.perf_counter()
        try:
            self.conn, worker = claim_worker(pool, device, served.name)
        except PoolError as e:
            raise pb_utils.TritonModelException(f"model '{served.name}': {e}") from None
        claim_s = time.perf_counter() - t
        self.pid = worker["pid"]
        t = time.perf_counter()
        request = {"params": params, "model_repository": args["model_repository"], "model_name": served.name,
                   "model_version": served.version, "device": device, "env": dict(os.environ)}
        info = None
        try:
            self.conn.send(("load", request))
            while info is None:
                for msg in self.conn.recv():
                    if msg[0] == "log":
                        log.log(msg[1], f"{msg[2]} (engine worker {self.pid})")
                    elif msg[0] == "error":
                        raise pb_utils.TritonModelException(msg[1])
                    elif msg[0] == "ready":
                        info = msg[1]
        except (EOFError, OSError) as e:
            self.conn.close()
            raise pb_utils.TritonModelException(
                f"model '{served.name}': the engine worker (pid {self.pid}) closed the connection while loading "
                f"the model ({type(e).__name__}); the engine pool's log says why") from None
        except BaseException:
            self.conn.close()
            raise
        self.phases = {"pool_claim": claim_s, **info["phases"], "worker_load": time.perf_counter() - t}
        self.offload_layers = info["offload_layers"]
        torch_here = "torch" in sys.modules
        self.summary = (f"{info['summary']} in engine worker pid {self.pid} of the pool {pool} (claimed in "
                        f"{claim_s:.3f}s; this stub imported torch: {'yes' if torch_here else 'no'})")
        self._reader = threading.Thread(target=self._read, name="tritonmoe-remote-reader", daemon=True)
        self._reader.start()

    def submit(self, seq_id: str, inputs: dict, stream: _Stream) -> None:
        with self._lock:
            if self._dead:
                raise Unavailable(self._dead)
            self._streams[seq_id] = stream
            try:
                self.conn.send(("submit", seq_id, inputs))
            except OSError as e:
                self._streams.pop(seq_id, None)
                raise Unavailable(self._gone_message(e)) from None

    def cancel(self, seq_id: str) -> None:
        with self._lock:
            if self._dead:
                return
            try:
                self.conn.send(("cancel", seq_id))
            except OSError:
                pass  # the reader notices the worker is gone and ends every open request

    def _gone_message(self, e: BaseException) -> str:
        return (f"model '{self.served.name}' lost its engine worker (pid {self.pid}: {type(e).__name__}, the "
                "process exited or was killed); unload and load the model again")

    def _read(self) -> None:
        deliver, served = self.served.deliver, self.served
        try:
            while True:
                for msg in self.conn.recv():
                    op = msg[0]
                    if op == "out":
                        out = self._from_wire(msg[1])
                        with self._lock:
                            stream = (self._streams.pop(out.seq_id, None) if out.finished
                                      else self._streams.get(out.seq_id))
                        if stream is not None:
                            deliver(stream, out)
                    elif op == "start":
                        with self._lock:
                            stream = self._streams.get(msg[1])
                        if stream is not None:
                            stream.started(msg[2])
                    elif op == "step":
                        served.on_step(msg[1], msg[2], msg[3])
                    elif op == "log":
                        log.log(msg[1], f"{msg[2]} (engine worker {self.pid})")
                    elif op == "closed":
                        self._end("the model is being unloaded", quiet=True)
                        return
        except (EOFError, OSError) as e:
            self._end(self._gone_message(e), quiet=self._closing)

    def _end(self, message: str, quiet: bool) -> None:
        """No more outputs will come: every open request ends with ``message`` (UNAVAILABLE), later ones too."""
        with self._lock:
            self._dead = self._dead or message
            streams, self._streams = self._streams, {}
        if not quiet:
            log.error(f"{message}; {len(streams)} open request(s) end with this error")
        for seq_id, stream in streams.items():
            self.served.deliver(stream, self._from_wire((seq_id, "", 0, 0, True, "unavailable", message,
                                                         None, None, ())))

    def close(self) -> None:
        with self._lock:
            self._closing = True
            dead = self._dead
            if not dead:
                try:
                    self.conn.send(("close",))
                except OSError:
                    pass
        self._reader.join(60)  # the worker ends open requests, says "closed" and exits
        self.conn.close()
