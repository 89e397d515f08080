"""A host-side simulation of the CUDA calls the offloading copy engine makes -- NOT a GPU, and no substitute for the
GPU tests (`pytest -m gpu`). It exists to check the engine's *ordering*: which waits it issues, on which streams,
so that no kernel reads a slot before its copy has landed and no copy overwrites a slot that issued kernels still
read, under every interleaving a GPU could choose.

Streams are FIFO queues run by a random scheduler: each step runs the head operation of a randomly chosen stream
whose head can run. An event record is an operation; a wait captures the event's latest record *at call time*
(CUDA's semantics; a never-recorded event makes it a no-op) and blocks its stream until that record has run; a
query reports whether the latest record has run. Copies are real host ``memmove``s, run when their operation runs.
Kernels are ``read`` operations the test puts on the compute stream.

Install with :func:`install` (monkeypatch), which returns the :class:`Sim` and a private copy of
``cuda_copy_engine`` bound to the stand-in modules (the real module, if imported, is left alone)."""

from __future__ import annotations

import ctypes
import importlib.util
import random
import sys
import types
from collections import deque
from pathlib import Path

OK, NOT_READY, INVALID_CONTEXT = 0, 600, 201
COMPUTE = 1  # the compute stream's handle (what torch would report as the current stream)


class Sim:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.streams: dict[int, deque] = {COMPUTE: deque()}
        self.recorded: dict[int, int] = {}  # event -> records issued
        self.reached: dict[int, int] = {}  # event -> records that have run
        self._next = 100
        self.calls: list[str] = []
        self.copied_bytes: list[int] = []

    def handle(self) -> int:
        self._next += 1
        return self._next

    # ---- the operations
    def new_stream(self) -> int:
        h = self.handle()
        self.streams[h] = deque()
        return h

    def new_event(self) -> int:
        h = self.handle()
        self.recorded[h] = self.reached[h] = 0
        return h

    def record(self, event, stream) -> tuple:
        self.calls.append("record")
        event, stream = int(event), int(stream)
        self.recorded[event] += 1
        self.streams[stream].append(("record", event, self.recorded[event]))
        return (OK,)

    def wait(self, stream, event, flags=0) -> tuple:
        self.calls.append("wait")
        event, stream = int(event), int(stream)
        if self.recorded[event]:
            self.streams[stream].append(("wait", event, self.recorded[event]))
        return (OK,)

    def query(self, event) -> tuple:
        self.calls.append("query")
        event = int(event)
        return (OK,) if self.reached[event] >= self.recorded[event] else (NOT_READY,)

    def copy(self, dst, src, nbytes, stream) -> tuple:
        self.calls.append("copy")
        self.streams[int(stream)].append(("copy", int(dst), int(src), int(nbytes)))
        return (OK,)

    def kernel(self, check) -> None:
        """A kernel on the compute stream: ``check()`` runs when the GPU would run it."""
        self.streams[COMPUTE].append(("read", check))

    # ---- the GPU
    def _runnable(self, op) -> bool:
        return op[0] != "wait" or self.reached[op[1]] >= op[2]

    def step(self) -> bool:
        ready = [s for s, q in self.streams.items() if q and self._runnable(q[0])]
        if not ready:
            if any(self.streams.values()):
                raise RuntimeError("deadlock: every non-empty stream waits")
            return False
        op = self.streams[self.rng.choice(ready)].popleft()
        if op[0] == "record":
            self.reached[op[1]] = max(self.reached[op[1]], op[2])
        elif op[0] == "copy":
            ctypes.memmove(op[1], op[2], op[3])
            self.copied_bytes.append(op[3])
        elif op[0] == "read":
            op[1]()
        return True

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if not self.step():
                return

    def drain(self) -> None:
        while self.step():
            pass


def install(monkeypatch, sim: Sim):
    """Stand-in ``cuda.bindings.runtime`` and ``cuda.bindings.driver`` on ``sim``; returns the engine module."""

    class Codes:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    rt = types.SimpleNamespace(
        cudaError_t=Codes(cudaSuccess=OK, cudaErrorNotReady=NOT_READY),
        cudaMemcpyKind=Codes(cudaMemcpyHostToDevice=1), cudaStreamNonBlocking=1, cudaEventDisableTiming=2,
        cudaStream_t=int, cudaGetErrorName=lambda err: (OK, b"stand-in error"),
        cudaSetDevice=lambda index: (OK,), cudaFree=lambda ptr: (OK,),
        cudaDeviceGetStreamPriorityRange=lambda: (OK, 0, -5),
        cudaStreamCreateWithPriority=lambda flags, priority: (OK, sim.new_stream()),
        cudaEventCreateWithFlags=lambda flags: (OK, sim.new_event()), cudaEventCreate=lambda: (OK, sim.new_event()),
        cudaEventElapsedTime=lambda start, end: (OK, 0.0),
        cudaStreamSynchronize=lambda stream: (sim.drain(), (OK,))[1],
        cudaEventDestroy=lambda event: (OK,), cudaStreamDestroy=lambda stream: (OK,),
        cudaMemcpyAsync=lambda dst, src, n, kind, stream: sim.copy(dst, src, n, stream),
        cudaEventRecord=sim.record, cudaStreamWaitEvent=sim.wait, cudaEventQuery=sim.query)
    drv = types.SimpleNamespace(
        CUresult=Codes(CUDA_SUCCESS=OK, CUDA_ERROR_NOT_READY=NOT_READY, CUDA_ERROR_INVALID_CONTEXT=INVALID_CONTEXT),
        CUstream=int, cuGetErrorName=lambda err: (OK, b"stand-in error"),
        cuMemcpyHtoDAsync=sim.copy, cuEventRecord=sim.record, cuStreamWaitEvent=sim.wait, cuEventQuery=sim.query)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, bindings.driver, cuda.bindings = rt, drv, bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt),
                         ("cuda.bindings.driver", drv)):
        monkeypatch.setitem(sys.modules, name, module)
    import tritonmoe.backend.offload as offload_pkg

    spec = importlib.util.spec_from_file_location("tritonmoe.backend.offload._simulated_cuda_copy_engine",
                                                  Path(offload_pkg.__file__).parent / "cuda_copy_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_on(module, sim: Sim, monkeypatch, num_slots: int, stats, api: str = "driver"):
    """A ``CudaCopyEngine`` of the simulated module, its compute stream the simulation's."""
    import contextlib

    import torch

    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    engine = module.CudaCopyEngine(torch.device("cuda", 0), num_slots, stats, api=api)
    engine._raw_stream = lambda index: COMPUTE
    return engine
