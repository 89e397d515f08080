"""The generation engine: continuous batching over a transformers MoE model.

One thread owns the model. Each iteration it drops cancelled sequences, prefills newly arrived requests one at a
time (each joins the running batch right away), then runs one decode step over every live sequence. Results go to
each request's ``sink`` (a cheap callable, typically a queue's ``put``); the engine never blocks on a client.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from .kv_batch import KVBatch, check_supported
from .sampling import RequestError, SamplingParams, request_seed, sample_row, token_generator
from .text import TextStream

log = logging.getLogger("tritonmoe.engine")


@dataclass
class Output:
    """One message to a request's sink: new text, and on the last one ``finished`` and the reason."""

    seq_id: str
    text: str
    prompt_tokens: int
    output_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    ttft: float | None = None  # seconds from submit to the first token, on the first output only
    itl: float | None = None  # seconds since the previous token, on later outputs
    token_ids: tuple[int, ...] = ()  # the token sampled for this output (what a migrating router records)


@dataclass
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Output], None]
    text: TextStream
    seed: int | None  # sampled requests draw token i from token_generator(seed, i)
    context_ids: list[int] = field(default_factory=list)  # what prefill computes: prompt + resumed output
    submitted: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None
    last_token: int | None = None
    output_tokens: int = 0
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer, *, max_num_seqs: int = 8, max_model_len: int | None = None,
                 offloader=None, on_step: Callable[[int, float], None] | None = None):
        check_supported(model.config)  # a model it cannot batch fails here, at load, not on every request
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", 4096)
        self.offloader = offloader
        self.on_step = on_step
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._pending: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._batch = KVBatch()
        self._cancelled: set[str] = set()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- public API, thread-safe -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None],
               seq_id: str | None = None, resume_ids: list[int] = (), text_chars_sent: int = 0) -> str:
        """Queue a request. ``resume_ids``/``text_chars_sent`` continue a generation that another server began
        (live migration): those tokens count as output already produced, and the KV cache is recomputed."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                               f"{self.max_model_len} tokens")
        text = TextStream(self.tokenizer, params.stop)
        if resume_ids:
            self._check_resume(prompt_ids, params, resume_ids)
            try:
                text.resume(resume_ids, text_chars_sent)
            except ValueError as e:
                raise RequestError(f"resume_state: {e}") from None
        seq = Sequence(id=seq_id or f"seq-{next(self._ids)}", prompt_ids=list(prompt_ids), params=params, sink=sink,
                       text=text, seed=request_seed(params), context_ids=list(prompt_ids) + list(resume_ids),
                       output_tokens=len(resume_ids))
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._pending.append(seq)
            self._cv.notify()
        return seq.id

    def _check_resume(self, prompt_ids: list[int], params: SamplingParams, resume_ids: list[int]) -> None:
        vocab = self.model.config.get_text_config().vocab_size
        bad = [t for t in resume_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"resume_state holds token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}")
        if len(resume_ids) >= params.max_tokens:
            raise RequestError(f"resume_state already holds {len(resume_ids)} tokens; max_tokens is "
                               f"{params.max_tokens}")
        if len(prompt_ids) + len(resume_ids) >= self.max_model_len:
            raise RequestError(f"prompt and resumed tokens ({len(prompt_ids) + len(resume_ids)}) fill the model's "
                               f"context ({self.max_model_len})")

    def cancel(self, seq_id: str) -> None:
        with self._cv:
            self._cancelled.add(seq_id)
            self._cv.notify()

    def generate(self, prompt: str, params: SamplingParams) -> Iterator[Output]:
        """Direct use without Triton (benchmarks, tests): yields this request's outputs as they come."""
        outputs: queue.Queue[Output] = queue.Queue()
        self.submit(self.tokenizer.encode(prompt), params, outputs.put)
        while True:
            out = outputs.get()
            yield out
            if out.finished:
                return

    @property
    def num_running(self) -> int:
        return len(self._running)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="tritonmoe-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, end every open one with an error, and stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for seq in list(self._pending) + self._running:
            if not seq.done:
                self._finish(seq, "error", error="the model is being unloaded")
        self._pending.clear()
        self._running.clear()

    # ---- the engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._pending or self._running):
                    self._cv.wait()
                if self._stopping:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop cancelled sequences, admit new ones (prefill), one decode step for all."""
        started = time.perf_counter()
        with self._cv:
            cancelled, self._cancelled = self._cancelled, set()
            admitted = []
            while self._pending and len(self._running) + len(admitted) < self.max_num_seqs:
                admitted.append(self._pending.popleft())
            waiting = [s for s in self._pending if s.id in cancelled]
            for seq in waiting:
                self._pending.remove(seq)
        for seq in waiting + [s for s in self._running + admitted if s.id in cancelled]:
            self._finish(seq, "cancelled")
        self._compact()
        try:
            for seq in admitted:
                if not seq.done:
                    self._prefill(seq)
            self._compact()
            if self._running:
                self._decode()
                self._compact()
        except Exception as e:  # an engine failure ends the affected requests, never the server
            log.exception("engine step failed")
            for seq in self._running + admitted:
                if not seq.done:
                    self._finish(seq, "error", error=f"generation failed: {type(e).__name__}: {e}")
            self._running, self._batch = [], KVBatch()
        if self.on_step is not None:
            self.on_step(len(self._running), time.perf_counter() - started)

    def _forward(self, seq_ids: list[str], phase: str, resumed: list[int] | None = None, **inputs) -> torch.Tensor:
        if self.offloader is not None:
            self.offloader.begin_forward(seq_ids, phase, resumed=resumed)
        return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].float()

    def _prefill(self, seq: Sequence) -> None:
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([seq.context_ids], device=self.device)
        # resumed output tokens were decode steps where the stream began: the offloader traces them as such
        resumed = len(seq.context_ids) - len(seq.prompt_ids)
        logits = self._forward([seq.id], "prefill", resumed=[resumed] if resumed else None, input_ids=ids,
                               past_key_values=cache)
        self._batch.add(cache, len(seq.context_ids))
        self._running.append(seq)
        self._accept(seq, self._pick([seq], logits)[0])

    def _decode(self) -> None:
        mask, positions = self._batch.step_inputs(self.device)
        ids = torch.tensor([[s.last_token] for s in self._running], device=self.device)
        logits = self._forward([s.id for s in self._running], "decode", input_ids=ids, attention_mask=mask,
                               position_ids=positions, past_key_values=self._batch.cache)
        self._batch.advance()
        for seq, token in zip(self._running, self._pick(self._running, logits)):
            self._accept(seq, token)

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """The next token of each row. Greedy rows share one argmax and one device-to-host copy per step (a copy
        per row would stall the GPU once per sequence)."""
        for row, seq in enumerate(seqs):
            if self.eos_ids and (seq.params.ignore_eos or seq.output_tokens < seq.params.min_tokens):
                logits[row, list(self.eos_ids)] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(seqs):
            if not seq.params.greedy:
                tokens[row] = sample_row(logits[row], seq.params, token_generator(seq.seed, seq.output_tokens))
        return tokens

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record ``seq``'s next token and tell its sink."""
        now = time.perf_counter()
        timing = ({"ttft": now - seq.submitted} if seq.last_token_time is None
                  else {"itl": now - seq.last_token_time})
        timing["token_ids"] = (token,)
        seq.last_token_time, seq.last_token = now, token
        seq.output_tokens += 1
        if token in self.eos_ids:
            self._finish(seq, "stop", **timing)
            return
        delta = seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, "stop", text=delta, **timing)
        elif seq.output_tokens >= seq.params.max_tokens:
            self._finish(seq, "length", text=delta, **timing)
        elif len(seq.prompt_ids) + seq.output_tokens >= self.max_model_len:
            self._finish(seq, "length", text=delta, **timing)
        else:
            seq.sink(Output(seq.id, delta, len(seq.prompt_ids), seq.output_tokens, **timing))

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None, **timing) -> None:
        seq.done = True
        if reason in ("stop", "length"):
            text += seq.text.finish()
        if self.offloader is not None:
            self.offloader.end_sequence(seq.id)
        seq.sink(Output(seq.id, text, len(seq.prompt_ids), seq.output_tokens, finished=True, finish_reason=reason,
                        error=error, **timing))

    def _compact(self) -> None:
        """Remove finished sequences from the running batch and its KV cache."""
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) != len(self._running):
            self._running = [self._running[i] for i in keep]
            self._batch.keep(keep)
