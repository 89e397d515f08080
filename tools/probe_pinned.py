"""Probe: does page-locking a large shared-memory mapping leave this process's CUDA context usable?

On the H200 VM a pool worker that page-locked the loader's 15.7 GB DRAM copy (245 ``cudaHostRegister`` calls of
64 MiB, read-only flag, on a copy-on-write mapping of a tmpfs file) copied it at 52 GB/s and then failed its first
forward (``cublasCreate`` INTERNAL_ERROR, later ``invalid argument``). This probe repeats that registration
pattern on a tmpfs file of the same size, one variant per child process (a broken context must not spoil the
next), and after registering does what that worker did -- the whole registered copy to a device allocation of the
same size (timed, one copy per registration) -- then a cuBLAS GEMM and the pool's tiny MoE warm-up forward, each on
a fresh thread (as the engine thread is), and a synchronise.

    python -m tritonmoe.tools.probe_pinned --gb 4,8,16 --variants readonly,default,shared,chunk1g

Variants: ``readonly`` = what the loader path does (MAP_PRIVATE, cudaHostRegisterReadOnly, 64 MiB pieces);
``default`` = flags 0; ``shared`` = a MAP_SHARED mapping (read-write), read-only flag; ``chunk1g`` = 1 GiB pieces.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import threading
import time

VARIANTS = {"readonly": (mmap.ACCESS_COPY, 8, 64 << 20), "default": (mmap.ACCESS_COPY, 0, 64 << 20),
            "shared": (mmap.ACCESS_WRITE, 8, 64 << 20), "chunk1g": (mmap.ACCESS_COPY, 8, 1 << 30)}


def child(path: str, nbytes: int, variant: str) -> dict:
    import torch

    access, flags, chunk = VARIANTS[variant]
    torch.cuda.init()
    torch.ones(1, device="cuda").sum().item()
    with open(path, "r+b" if access == mmap.ACCESS_WRITE else "rb") as f:
        m = mmap.mmap(f.fileno(), nbytes, access=access)
    base = torch.frombuffer(m, dtype=torch.uint8)
    addr = base.data_ptr()
    cudart = torch.cuda.cudart()
    result = {"variant": variant, "gb": nbytes / 1e9, "pieces": 0}
    t = time.perf_counter()
    for off in range(0, nbytes, chunk):
        err = int(cudart.cudaHostRegister(addr + off, min(chunk, nbytes - off), flags))
        if err:
            result["register_error"] = f"CUDA error {err} at piece {off // chunk}"
            break
        result["pieces"] += 1
    result["register_s"] = round(time.perf_counter() - t, 2)
    checks = {}

    def on_new_thread(name, fn):  # the engine thread is a new thread too: it borrows or creates cuBLAS handles
        def run():
            try:
                checks[name] = fn()
            except Exception as e:  # noqa: BLE001 - the probe reports whatever fails
                checks[name] = f"{type(e).__name__}: {str(e)[:200]}"

        th = threading.Thread(target=run)
        th.start()
        th.join()

    def gemm():
        x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        return f"ok {float((x @ x).float().abs().mean()):.3f}"

    def tiny_forward():
        from tritonmoe.backend.engine_worker import _tiny_forward

        _tiny_forward(torch.device("cuda", torch.cuda.current_device()))
        return "ok"

    on_new_thread("gemm_new_thread", gemm)
    dev = None
    try:  # what the pre-pinned pool worker did: the whole registered copy to the GPU, one copy per registration
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        if "register_error" not in result:
            torch.cuda.synchronize()
            t = time.perf_counter()
            for off in range(0, nbytes, chunk):  # CUDA refuses a copy across two registrations
                dev[off:off + chunk].copy_(base[off:off + chunk], non_blocking=True)
            torch.cuda.synchronize()
            checks["copy_gbps"] = round(nbytes / (time.perf_counter() - t) / 1e9, 1)
            checks["copy_bits_equal"] = bool(torch.equal(dev[-(1 << 20):].cpu(), base[-(1 << 20):]))
    except Exception as e:  # noqa: BLE001
        checks["alloc_or_copy"] = f"{type(e).__name__}: {str(e)[:200]}"
    on_new_thread("gemm_new_thread_after_copy", gemm)
    on_new_thread("tiny_moe_forward_after_copy", tiny_forward)
    try:
        torch.cuda.synchronize()
        checks["sync"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["sync"] = f"{type(e).__name__}: {str(e)[:200]}"
    del dev
    result.update(checks)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonmoe.tools.probe_pinned", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", default="16", help="comma-separated sizes in GB (each variant at each size)")
    p.add_argument("--variants", default="readonly", help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--path", default="/dev/shm/tritonmoe-probe-pinned")
    p.add_argument("--child", nargs=2, metavar=("BYTES", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.path, int(a.child[0]), a.child[1])), flush=True)
        return 0
    sizes = [int(float(x) * 1e9) // (64 << 20) * (64 << 20) for x in a.gb.split(",")]
    with open(a.path, "wb") as f:  # real pages (a sparse file would page-lock the zero page)
        block = os.urandom(1 << 20) * 64
        for _ in range(max(sizes) // len(block)):
            f.write(block)
    try:
        for size in sizes:
            for variant in a.variants.split(","):
                out = subprocess.run([sys.executable, "-m", "tritonmoe.tools.probe_pinned", "--path", a.path,
                                      "--child", str(size), variant], capture_output=True, text=True, timeout=300)
                line = out.stdout.strip().splitlines()[-1:] or [json.dumps({"variant": variant, "gb": size / 1e9,
                                                                           "child_failed": out.stderr[-400:]})]
                print(line[0], flush=True)
    finally:
        os.unlink(a.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
