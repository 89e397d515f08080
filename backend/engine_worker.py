"""The engine side of a served model, and the warm engine-pool worker process that hosts it.

:class:`EngineHost` is what a model instance runs on: weights and tokenizer (:func:`load_for_serving`), the
continuous-batching :class:`~tritonmoe.backend.engine.Engine`, request parsing and the step/offload statistics.
It runs either inside Triton's stub (the in-process path, :mod:`tritonmoe.backend.serving`) or in a worker process
of the engine pool (:mod:`tritonmoe.backend.engine_pool`), started ahead of any load by

    python -m tritonmoe.backend.engine_worker --address SOCKET --device cpu|cuda:N

which imports torch, transformers and the model classes, creates the CUDA context, warms cuBLAS and the kernels
of a tiny MoE forward, listens on ``SOCKET`` (a Unix socket; key in ``$TRITONMOE_ENGINE_POOL_KEY``) and prints
``READY {json}``. Its stub then connects and the conversation is (each message a tuple; the worker sends lists):

- stub: ``("load", {params, model_repository, model_name, model_version, device, env})`` -> worker:
  ``("log", level, text)`` ... then ``("ready", info)`` or ``("error", message)`` (and it exits);
- stub: ``("submit", seq_id, inputs)`` with the request's raw inputs -> worker: ``("start", seq_id, (stream,
  prepend_prompt, prompt))`` once parsed, then ``("out", wire)`` per engine output (a rejected request gets one
  ``out`` with ``finish_reason`` ``invalid``); ``("step", running, seconds, offload_stats)`` after engine steps;
- stub: ``("cancel", seq_id)``; ``("close",)`` -> the engine shuts down (open requests end with an error),
  worker: ``("closed",)``, and it exits. End of file on the connection (the stub died) -> it exits at once.
"""

from __future__ import annotations

import time

_T_IMPORT = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from .config import EngineConfig  # noqa: E402
from .engine import Engine  # noqa: E402
from .protocol import parse_request  # noqa: E402
from .sampling import RequestError  # noqa: E402
from .weights import load_for_serving  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _T_IMPORT
OFFLOAD_METRICS_SECONDS = 1.0  # how often the expert cache's counters are exported
STAGING_SLOTS = 16  # stream_reader_to_device's ring
CONNECT_TIMEOUT = 60.0  # a claimed worker whose stub never connects exits after this long

log = logging.getLogger("tritonmoe")


def resolve_device(spec: str) -> torch.device:
    """``cpu``, ``cuda:N`` (made the current device: Triton does not restrict visibility) or ``auto`` (GPU 0 when
    there is one: a ``KIND_MODEL`` instance)."""
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class EngineHost:
    """A loaded model and its running engine. ``on_step(running, seconds, offload_stats_or_None)`` is called on
    the engine thread after each step (offloading statistics at most once a second, and when the batch empties)."""

    def __init__(self, cfg: EngineConfig, device: torch.device,
                 on_step: Callable[[int, float, dict | None], None] | None = None):
        self.cfg, self.device = cfg, device
        loaded = load_for_serving(cfg, device)
        self.model, self.tokenizer, self.offloader = loaded.model, loaded.tokenizer, loaded.offloader
        self.phases, self.layout = dict(loaded.phases), loaded.layout
        self._on_step_cb, self._next_offload_publish = on_step, 0.0
        self._first_step_logged = False
        self._faults_at_ready = _page_faults()
        self._trace = None
        if self.offloader is not None and cfg.offload.trace_path:
            from .offload.trace_file import OffloadTraceWriter

            self._trace = OffloadTraceWriter(cfg.offload.trace_path, self.offloader.store.num_layers,
                                             model=str(cfg.checkpoint), device=str(device),
                                             cache_slots=self.offloader.num_slots, budget=cfg.offload.cache_budget,
                                             eviction=cfg.offload.eviction, prefetch=cfg.offload.prefetch)
        self.engine = Engine(self.model, self.tokenizer, max_num_seqs=cfg.max_num_seqs,
                             max_model_len=cfg.max_model_len, offloader=self.offloader,
                             on_step=self._on_step if on_step is not None or self._trace is not None else None)
        self.max_model_len = self.engine.max_model_len
        self.engine.start()

    def info(self) -> dict:
        cfg, off = self.cfg, self.offloader
        offload = None if off is None else (f"experts offloaded (cache {off.num_slots} slots = "
                                            f"{cfg.offload.cache_budget}, eviction {cfg.offload.eviction}, "
                                            f"prefetch {cfg.offload.prefetch})")
        dtype = next(self.model.parameters()).dtype
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in self.phases.items())
        summary = (f"on {self.device} ({dtype}; torch {torch.__version__}): {self.layout} checkpoint {cfg.checkpoint} "
                   f"({phases}), max_num_seqs={cfg.max_num_seqs}, max_model_len={self.max_model_len}"
                   + (f", {offload}" if offload else ""))
        return {"phases": self.phases, "device": str(self.device), "summary": summary,
                "max_model_len": self.max_model_len,
                "offload_layers": None if off is None else off.store.num_layers}

    def submit(self, seq_id: str, inputs: dict, start: Callable[[tuple], Callable]) -> None:
        """Parse a request's raw inputs and queue it. ``start((stream, prepend_prompt, prompt))`` is called once
        the request is valid, before the engine can produce output, and returns the request's sink. Raises
        :class:`RequestError` (a malformed request) or :class:`RuntimeError` (the engine is shutting down)."""
        parsed = parse_request(
            text_input=inputs.get("text_input"), stream=inputs.get("stream"),
            sampling_parameters=inputs.get("sampling_parameters"),
            exclude_input_in_output=inputs.get("exclude_input_in_output"),
            request_parameters=inputs.get("parameters"), tokenizer=self.tokenizer,
            max_model_len=self.max_model_len, default_max_tokens=self.cfg.default_max_tokens,
            resume_state=inputs.get("resume_state"))
        sink = start((parsed.stream, parsed.prepend_prompt, parsed.prompt))
        self.engine.submit(parsed.prompt_ids, parsed.params, sink, seq_id=seq_id, resume_ids=list(parsed.resume_ids),
                           text_chars_sent=parsed.text_chars_sent)

    def cancel(self, seq_id: str) -> None:
        self.engine.cancel(seq_id)

    def _on_step(self, running: int, seconds: float) -> None:
        if not self._first_step_logged:
            # the first forward pays whatever the warm-up did not (lazy kernel loading for this model's shapes,
            # allocator growth): logged so a slow first token can be told apart from time spent outside the engine
            self._first_step_logged = True
            major, minor = (now - then for now, then in zip(_page_faults(), self._faults_at_ready))
            # page faults since the model was ready: a first step that reads kernels (or anything else) back from
            # disk shows major faults
            log.info(f"first engine step of this model: {seconds:.3f}s ({running} running; page faults since "
                     f"ready: {major} major, {minor} minor)")
        # on the engine thread, between forwards: the only place the offloader's counters are consistent
        publish = self._on_step_cb is not None and self.offloader is not None and (
            running == 0 or time.monotonic() >= self._next_offload_publish)
        stats = self.offloader.stats() if publish or self._trace is not None else None  # one snapshot for both
        if self._trace is not None:
            self._trace.step(running, seconds, stats)
        if self._on_step_cb is None:
            return
        if publish:
            self._next_offload_publish = time.monotonic() + OFFLOAD_METRICS_SECONDS
        self._on_step_cb(running, seconds, stats if publish else None)

    def close(self) -> None:
        self.engine.shutdown()
        if self._trace is not None:
            self._trace.close()
        if self.offloader is not None:
            self.offloader.close()  # waits for copies in flight; saves the EAMC when eamc_path is set


def _page_faults() -> tuple[int, int]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_majflt, usage.ru_minflt


# ---- warm-up (before any claim) ----------------------------------------------------------------------------------
WARM_MODULES = (  # transformers imports model code lazily: pay for the supported architectures now
    "transformers.models.mixtral.modeling_mixtral", "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "transformers.models.qwen2_moe.modeling_qwen2_moe", "transformers.models.deepseek_v2.modeling_deepseek_v2",
    "transformers.models.deepseek_v3.modeling_deepseek_v3", "transformers.models.olmoe.modeling_olmoe",
    "tritonmoe.loader.hf_model", "tritonmoe.loader.client", "tritonmoe.backend.offload",
)


def warm_up(device: torch.device, kernels: bool = True) -> dict[str, float]:
    """Everything a model load would otherwise pay for before its weights move. Returns seconds per phase."""
    import importlib

    phases = {"imports": IMPORT_SECONDS}
    t = time.perf_counter()
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:  # an older transformers without one architecture: not fatal
            log.warning("warm-up: cannot import %s: %s", name, e)
    phases["model_classes"] = time.perf_counter() - t
    if device.type == "cuda":
        t = time.perf_counter()
        torch.cuda.init()
        _on_a_passing_thread(_gemms, device)
        phases["cuda_context"] = time.perf_counter() - t
        # The loader path copies through a ring of pinned staging buffers (loader/device_copy.py, 16 x 64 MiB)
        # unless the DRAM copy is page-locked; page-locking 1 GiB costs a fresh process ~0.7 s (docs/loader.md).
        # Allocated and freed here, they stay in torch's caching host allocator and the load reuses them.
        t = time.perf_counter()
        from tritonmoe.loader.device_copy import DEFAULT_COPY_CHUNK

        ring = [torch.empty(DEFAULT_COPY_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING_SLOTS)]
        del ring
        phases["pinned_staging"] = time.perf_counter() - t
    if kernels:
        t = time.perf_counter()
        try:
            _on_a_passing_thread(_tiny_forward, device)
        except Exception as e:  # a warm-up that fails costs the first request some time, nothing else
            log.warning("warm-up: the tiny MoE forward failed (%s: %s); continuing", type(e).__name__, e)
        phases["kernels"] = time.perf_counter() - t
    return phases


def _on_a_passing_thread(fn: Callable[[torch.device], None], device: torch.device) -> None:
    """Run ``fn(device)`` on a thread that then exits. torch lends each thread its own cuBLAS / cuBLASLt handles
    and takes them back into a per-device pool when the thread ends; the engine thread, started at load, then
    borrows these instead of creating its own on the first request. Warmed on this (main) thread, they would
    stay with it, and the first token would pay for ``cublasCreate`` -- which, after page-locking a 16 GB DRAM
    copy (``--prepin-loader``), failed outright on the H200 (CUBLAS_STATUS_INTERNAL_ERROR)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            fn(device)
        except BaseException as e:  # re-raised on the caller's thread
            failure.append(e)

    thread = threading.Thread(target=run, name="tritonmoe-warm-up")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _gemms(device: torch.device) -> None:
    x = torch.ones(256, 256, device=device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # cuBLAS handle, workspace, GEMM kernels
        (x.to(dtype) @ x.to(dtype)).sum().item()
    torch.cuda.synchronize(device)


@torch.inference_mode()
def _tiny_forward(device: torch.device) -> None:
    """A prefill and a batched decode step of a tiny random Mixtral in the dtype a GPU model would use: loads the
    attention, MoE and sampling kernels (CUDA loads kernels lazily, on first use)."""
    from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM

    from .weights import _choose_experts_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    with torch.device(device):
        model = MixtralForCausalLM(config).to(dtype).eval()
    _choose_experts_kernel(model, "auto", device)
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    cache = DynamicCache(config=config)
    ids = torch.arange(1, 9, device=device)[None]
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    nxt = logits.argmax(-1, keepdim=True)
    model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.float().softmax(-1).tolist()
    del model, cache
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def prepin(loader_url: str, device: torch.device) -> tuple[float, int, int]:
    """Map every model the loader holds in its DRAM cache and, on a GPU, page-lock it in place, before any claim:
    a later load of one of them through that loader copies at the pinned PCIe rate instead of page-locking on the
    way (weights.PREOPENED). Returns (seconds, models, bytes)."""
    from tritonmoe.loader.client import LoaderClient, ShmCheckpoint

    from . import weights

    t, count, nbytes = time.perf_counter(), 0, 0
    for m in LoaderClient(loader_url, timeout=60).status().get("models", []):
        path = m.get("shm_path")
        if not path or path in weights.PREOPENED:
            continue
        try:
            ckpt = ShmCheckpoint(path, expect_fingerprint=m.get("fingerprint"))
            if device.type == "cuda":
                ckpt.pin()
        except Exception as e:  # evicted meanwhile, or page-locking refused: that load just pays as usual
            log.warning("pre-pinning %s failed: %s: %s", path, type(e).__name__, e)
            continue
        weights.PREOPENED[path] = ckpt
        count, nbytes = count + 1, nbytes + sum(ckpt.index.partitions)
    return time.perf_counter() - t, count, nbytes


# ---- the worker process ------------------------------------------------------------------------------------------
@contextmanager
def _environment(env: dict | None):
    """The stub's environment while its parameters are read ($VARS and $TRITONMOE_HOME in checkpoint paths)."""
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _Forward(logging.Handler):
    """The worker's log records also go to its stub, which writes them to Triton's log."""

    def __init__(self, outbox: queue.Queue):
        super().__init__(logging.INFO)
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.outbox.put(("log", record.levelno, self.format(record)))
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


class Worker:
    def __init__(self, conn, tag: str):
        self.conn, self.tag = conn, tag
        self.outbox: queue.Queue = queue.Queue()
        self.host: EngineHost | None = None
        self._writer = threading.Thread(target=self._write, name="tritonmoe-worker-writer", daemon=True)
        self._writer.start()

    def _write(self) -> None:
        """The one thread that sends: drains the outbox into one message list per send."""
        done = False
        while not done:
            batch = [self.outbox.get()]
            while True:
                try:
                    batch.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                batch, done = batch[:batch.index(None)], True
            if batch:
                try:
                    self.conn.send(batch)
                except OSError:
                    log.warning("%s: the stub went away; exiting", self.tag)
                    os._exit(0)

    def flush_and_exit(self, code: int) -> None:
        self.outbox.put(None)
        self._writer.join(30)
        self.conn.close()
        logging.shutdown()
        os._exit(code)  # skip interpreter teardown: the GPU memory goes back at once

    def load(self, request: dict) -> None:
        handler = _Forward(self.outbox)
        handler.setFormatter(logging.Formatter("%(message)s"))  # the stub's own handler adds "[tritonmoe]"
        logging.getLogger("tritonmoe").addHandler(handler)
        try:
            with _environment(request.get("env")):
                cfg = EngineConfig.from_parameters(request["params"], request.get("model_repository"))
            device = resolve_device(request["device"])
            on_step = self._on_step if cfg.report_metrics else None
            self.host = EngineHost(cfg, device, on_step=on_step)
        except Exception as e:  # every load error goes back to the stub, which fails the Triton load with it
            log.error("%s: loading %r failed: %s: %s", self.tag, request.get("model_name"), type(e).__name__, e)
            logging.getLogger("tritonmoe").removeHandler(handler)
            self.outbox.put(("error", f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, RuntimeError))
                             else str(e)))
            self.flush_and_exit(1)
        logging.getLogger("tritonmoe").removeHandler(handler)
        info = self.host.info()
        log.info("%s: model %r ready %s", self.tag, request.get("model_name"), info["summary"])
        self.outbox.put(("ready", info))

    def _on_step(self, running: int, seconds: float, stats: dict | None) -> None:
        self.outbox.put(("step", running, seconds, stats))

    def _submit(self, seq_id: str, inputs: dict) -> None:
        outbox = self.outbox

        def start(info: tuple):
            outbox.put(("start", seq_id, info))  # before the engine can produce this request's first output
            return lambda out: outbox.put(("out", (out.seq_id, out.text, out.prompt_tokens, out.output_tokens,
                                                   out.finished, out.finish_reason, out.error, out.ttft, out.itl,
                                                   tuple(out.token_ids))))

        try:
            self.host.submit(seq_id, inputs, start)
        except RequestError as e:
            outbox.put(("out", (seq_id, "", 0, 0, True, "invalid", str(e), None, None, ())))
        except RuntimeError as e:  # engine shutting down
            outbox.put(("out", (seq_id, "", 0, 0, True, "unavailable", str(e), None, None, ())))
        except Exception as e:  # a bug must end this request, not the worker and every other request with it
            log.exception("%s: submitting %s failed", self.tag, seq_id)
            outbox.put(("out", (seq_id, "", 0, 0, True, "error", f"{type(e).__name__}: {e}", None, None, ())))

    def serve(self) -> None:
        try:
            request = self.conn.recv()
        except (EOFError, OSError):
            log.info("%s: the stub went away before sending the model; exiting", self.tag)
            os._exit(0)
        if not (isinstance(request, tuple) and request[0] == "load"):
            self.outbox.put(("error", f"expected a load request, got {request!r:.100}"))
            self.flush_and_exit(1)
        self.load(request[1])
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                log.info("%s: the stub went away; exiting", self.tag)
                os._exit(0)
            op = msg[0]
            if op == "submit":
                self._submit(msg[1], msg[2])
            elif op == "cancel":
                self.host.cancel(msg[1])
            elif op == "close":
                self.host.close()  # open requests end with "the model is being unloaded"
                self.outbox.put(("closed",))
                log.info("%s: model unloaded; exiting", self.tag)
                self.flush_and_exit(0)
            else:
                log.warning("%s: unknown message %r", self.tag, op)


def _watch_pool(claimed: threading.Event, connected: threading.Event, tag: str) -> None:
    """The pool writes ``claimed`` to our stdin. End of file before that: the pool is gone, so a warm worker
    nobody can claim exits. After it: a stub has our address; if it does not connect in time, exit."""
    for line in sys.stdin:
        if line.strip() == "claimed":
            claimed.set()
            break
    else:
        if not claimed.is_set():
            log.info("%s: the pool went away before a claim; exiting", tag)
            os._exit(0)
    if not connected.wait(CONNECT_TIMEOUT):
        log.warning("%s: claimed, but no stub connected within %.0fs; exiting", tag, CONNECT_TIMEOUT)
        os._exit(3)


def main(argv: list[str] | None = None) -> int:
    from multiprocessing.connection import AuthenticationError, Listener

    p = argparse.ArgumentParser(prog="python -m tritonmoe.backend.engine_worker",
                                description="A warm engine worker of the engine pool (started by the pool).")
    p.add_argument("--address", required=True, help="Unix socket to listen on for the claiming stub")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--no-kernel-warmup", action="store_true", help="skip the tiny MoE forward")
    p.add_argument("--prepin-loader", metavar="URL",
                   help="map (and on a GPU page-lock) the DRAM-resident models of this loader before a claim")
    a = p.parse_args(argv)
    tag = f"worker {os.getpid()} ({a.device})"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [engine-worker %(process)d] %(levelname)s %(message)s")
    logging.getLogger("tritonmoe").setLevel(logging.INFO)
    key = os.environ.pop("TRITONMOE_ENGINE_POOL_KEY", "")
    if not key:
        print("FAILED " + json.dumps({"error": "no key in $TRITONMOE_ENGINE_POOL_KEY (workers are started by "
                                               "tritonmoe-engine-pool)"}), flush=True)
        return 2
    try:
        device = resolve_device(a.device)
        phases = warm_up(device, kernels=not a.no_kernel_warmup)
        prepinned = {}
        if a.prepin_loader:
            try:
                phases["prepin"], models, nbytes = prepin(a.prepin_loader, device)
                prepinned = {"models": models, "bytes": nbytes}
            except Exception as e:  # the loader is down: warm anyway, without
                log.warning("%s: pre-pinning through %s failed: %s: %s", tag, a.prepin_loader, type(e).__name__, e)
        old = os.umask(0o177)
        try:
            listener = Listener(a.address, family="AF_UNIX", authkey=bytes.fromhex(key))
        finally:
            os.umask(old)
    except Exception as e:
        print("FAILED " + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    claimed, connected = threading.Event(), threading.Event()
    threading.Thread(target=_watch_pool, args=(claimed, connected, tag), name="tritonmoe-worker-pool",
                     daemon=True).start()
    print("READY " + json.dumps({"phases": phases, "torch": torch.__version__, "prepinned": prepinned}),
          flush=True)
    while True:
        try:
            conn = listener.accept()
            break
        except (AuthenticationError, OSError, EOFError) as e:
            log.warning("%s: refused a connection: %s", tag, e)
    connected.set()
    listener.close()  # one stub per worker; the socket file goes away
    log.info("%s: connected to its stub", tag)
    Worker(conn, tag).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
