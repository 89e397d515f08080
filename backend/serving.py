"""A served model inside Triton's Python backend: the engine, its sender and metrics threads, request parsing.

``execute`` only validates requests and hands them to the engine thread; a sender thread streams responses back
(each ``send`` is a blocking IPC round trip) and notices cancelled requests; a metrics thread updates Prometheus.
:mod:`tritonmoe.backend.triton_model` (what ``model.py`` re-exports) creates one per model instance.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from .config import EngineConfig, parameters_from_model_config
from .engine import Engine, Output
from .metrics import OffloadMetrics, TritonMetrics
from .weights import load_for_serving
from .protocol import ParsedRequest, parse_request
from .sampling import RequestError

CANCEL_CHECK_SECONDS = 0.1  # is_cancelled() is an IPC call: poll each request at most this often
OFFLOAD_METRICS_SECONDS = 1.0  # how often the expert cache's counters are exported


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
    parsed: ParsedRequest
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # not yet sent (streaming) or all (non-streaming)
    next_cancel_check: float = 0.0


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one element, got {values.size}")
    return values[0]


def _response(text: str, out: Output, token_ids: list[int]) -> "pb_utils.InferenceResponse":
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
        self.cfg = EngineConfig.from_parameters(parameters_from_model_config(model_config), args["model_repository"])
        self.device = self._device(args)

        loaded = load_for_serving(self.cfg, self.device)
        model, self.tokenizer, self.offloader = loaded.model, loaded.tokenizer, loaded.offloader

        self.metrics = self._metrics() if self.cfg.report_metrics else None
        self.offload_metrics, self._next_offload_publish = None, 0.0
        if self.metrics:
            self.metrics.startup(loaded.phases)
            if self.offloader is not None:
                self.offload_metrics = OffloadMetrics(self.metrics, self.offloader.store.num_layers)
        self.engine = Engine(model, self.tokenizer, max_num_seqs=self.cfg.max_num_seqs,
                             max_model_len=self.cfg.max_model_len, offloader=self.offloader, on_step=self._on_step)
        self.max_model_len = self.engine.max_model_len
        self._outbox: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="tritonmoe-sender", daemon=True)
        self._sender.start()
        self.engine.start()
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in loaded.phases.items())
        offload = "" if self.offloader is None else (
            f", experts offloaded (cache {self.offloader.num_slots} slots = {self.cfg.offload.cache_budget}, "
            f"eviction {self.cfg.offload.eviction}, prefetch {self.cfg.offload.prefetch})")
        log.info(f"model '{self.name}' ready on {self.device} ({next(model.parameters()).dtype}; torch "
                 f"{torch.__version__}, numpy {np.__version__} from {np.__file__}): "
                 f"{loaded.layout} checkpoint {self.cfg.checkpoint} ({phases}), "
                 f"max_num_seqs={self.cfg.max_num_seqs}, max_model_len={self.max_model_len}{offload}")

    @staticmethod
    def _device(args: dict) -> torch.device:
        kind = args.get("model_instance_kind", "CPU")
        if kind == "GPU":
            device = torch.device("cuda", int(args.get("model_instance_device_id", 0)))
            torch.cuda.set_device(device)  # Triton does not restrict visibility; pick ours explicitly
            return device
        if kind == "MODEL" and torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")

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
                parsed = parse_request(
                    text_input=_input(request, "text_input"), stream=_input(request, "stream"),
                    sampling_parameters=_input(request, "sampling_parameters"),
                    exclude_input_in_output=_input(request, "exclude_input_in_output"),
                    request_parameters=request.parameters(), tokenizer=self.tokenizer,
                    max_model_len=self.max_model_len, default_max_tokens=self.cfg.default_max_tokens,
                    resume_state=_input(request, "resume_state"))
                stream = _Stream(sender, parsed)
                self.engine.submit(parsed.prompt_ids, parsed.params, lambda out, s=stream: self._outbox.put((s, out)),
                                   seq_id=f"{request.request_id() or 'req'}-{id(stream):x}",
                                   resume_ids=list(parsed.resume_ids), text_chars_sent=parsed.text_chars_sent)
            except RequestError as e:
                sender.send(_error(str(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                if self.metrics:
                    self.metrics.request_finished("invalid")
            except RuntimeError as e:  # engine shutting down
                sender.send(_error(str(e), pb_utils.TritonError.UNAVAILABLE),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

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

    def _send(self, stream: _Stream, out: Output) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if out.error:
            stream.sender.send(_error(out.error, pb_utils.TritonError.INTERNAL), flags=final)
        elif out.finish_reason == "cancelled":
            stream.sender.send(_error("request cancelled", pb_utils.TritonError.CANCELLED), flags=final)
        elif stream.parsed.stream:
            stream.token_ids.extend(out.token_ids)
            if out.text or out.finished:
                # token ids ride along with the next text: a response never reports text its ids do not explain
                stream.sender.send(_response(out.text, out, stream.token_ids), flags=final if out.finished else 0)
                stream.token_ids = []
        else:
            stream.text.append(out.text)
            stream.token_ids.extend(out.token_ids)
            if out.finished:
                text = "".join(([stream.parsed.prompt] if stream.parsed.prepend_prompt else []) + stream.text)
                stream.sender.send(_response(text, out, stream.token_ids), flags=final)
        now = time.monotonic()
        if not out.finished and now >= stream.next_cancel_check:
            stream.next_cancel_check = now + CANCEL_CHECK_SECONDS
            if stream.sender.is_cancelled():
                log.info(f"request {out.seq_id} cancelled by the client")
                self.engine.cancel(out.seq_id)

    def _record(self, out: Output) -> None:
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

    def _on_step(self, running: int, seconds: float) -> None:
        if self.metrics:
            self.metrics.update(self.metrics.batch.set, running)
            self.metrics.update(self.metrics.step_seconds.observe, seconds)
        # on the engine thread, between forwards: the only place the offloader's counters are consistent
        if self.offload_metrics and (running == 0 or time.monotonic() >= self._next_offload_publish):
            self._next_offload_publish = time.monotonic() + OFFLOAD_METRICS_SECONDS
            self.offload_metrics.publish(self.offloader.stats())

    def finalize(self) -> None:
        self.engine.shutdown()
        if self.offloader is not None:
            self.offloader.close()  # waits for copies in flight; saves the EAMC when eamc_path is set
        self._outbox.put(None)
        self._sender.join(30)
        if self.metrics:
            self.metrics.close()
        self.engine = None
        gc.collect()
