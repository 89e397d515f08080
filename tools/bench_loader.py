"""CPU read throughput of the tritonmoe reader against safetensors, on one random MoE-shaped checkpoint.

    python -m tritonmoe.tools.bench_loader --gb 2 --dir /tmp/bench-loader

Builds (once) a sharded safetensors checkpoint of bf16 tensors named like Mixtral's, converts it, then times
loading every tensor into CPU memory, each case after warming the page cache ("warm") or after evicting the files
from it with posix_fadvise(DONTNEED) ("cold"; no root needed). O_DIRECT reads bypass the page cache, so they
are always cold. The first rows are floors: allocating and touching fresh memory of the checkpoint's size (no
I/O), and the disk itself (one thread, 64 MiB O_DIRECT reads of the partition files).
Prints a Markdown table with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tritonmoe.loader.convert import convert
from tritonmoe.loader.format import partition_file_name, read_index
from tritonmoe.loader.reader import CheckpointReader, aligned_buffer, writable_view

HIDDEN, EXPERT_FFN, EXPERTS = 1024, 3584, 8  # one expert = 3 x 7 MiB in bf16


def make_checkpoint(folder: Path, gib: float, shards: int) -> Path:
    """A Mixtral-shaped random bf16 checkpoint of about ``gib`` GiB in ``shards`` files (reused when present)."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    expert_bytes = 3 * HIDDEN * EXPERT_FFN * 2
    layers = max(1, round(gib * 2**30 / (EXPERTS * expert_bytes)))
    tensors = {"model.embed_tokens.weight": (32000, HIDDEN), "lm_head.weight": (32000, HIDDEN)}
    for layer in range(layers):
        tensors[f"model.layers.{layer}.self_attn.qkv.weight"] = (3 * HIDDEN, HIDDEN)
        for e in range(EXPERTS):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            tensors[f"{prefix}.w1.weight"] = (EXPERT_FFN, HIDDEN)
            tensors[f"{prefix}.w2.weight"] = (HIDDEN, EXPERT_FFN)
            tensors[f"{prefix}.w3.weight"] = (EXPERT_FFN, HIDDEN)
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        shard_names = names[s::shards]  # interleaved, as real shards mix layers and experts
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: torch.empty(tensors[n], dtype=torch.int16).random_().view(torch.bfloat16)
                   for n in shard_names}, folder / file)
        weight_map |= {n: file for n in shard_names}
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def evict(files: list[Path]) -> None:
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def disk_sequential(files: list[Path]) -> None:
    buffer = aligned_buffer(64 << 20)
    view = writable_view(buffer)
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        offset = 0
        while n := os.preadv(fd, [view], offset):
            offset += n
        os.close(fd)


def timed(fn, repeat: int, prepare) -> float:
    best = float("inf")
    for _ in range(repeat):
        prepare()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        del result
    return best


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 2**20
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem} GiB RAM, Linux {platform.release()}"


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()
    return out[-1].split()[1] if len(out) > 1 else "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="checkpoint size, GiB")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--dir", type=Path, default=Path("/tmp/bench-loader"))
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--chunk-mb", type=int, default=32)
    a = p.parse_args(argv)

    hf = make_checkpoint(a.dir / "hf", a.gb, a.shards)
    converted = convert(hf, a.dir / "converted", progress=False).dest
    index = read_index(converted)
    size = sum(t.bytes for t in index.tensors.values())  # tensor data, the same for every case
    shards = sorted(hf.glob("*.safetensors"))
    partitions = [converted / partition_file_name(i) for i in range(len(index.partitions))]
    options = dict(threads=a.threads, chunk_bytes=a.chunk_mb << 20)

    def reader(direct: bool, verify: bool):
        def run():
            with CheckpointReader(converted, direct=direct, **options) as r:
                return r.load_state_dict(verify=verify)
        return run

    # The loader service reads into a shared-memory pool it allocated once; fresh memory costs a page fault per
    # 4 KiB on first touch, which on a VM can cost more than the read itself, so the two are measured apart.
    pool = [aligned_buffer(n) for n in index.partitions]
    for buffer in pool:
        buffer.fill_(0)

    def reader_into_pool(direct: bool, verify: bool):
        def run():
            with CheckpointReader(converted, direct=direct, **options) as r:
                return r.load_state_dict(verify=verify, buffers=pool)
        return run

    def fresh_memory():
        return [aligned_buffer(n).fill_(0) for n in index.partitions]

    def safetensors_materialised():
        out = {}
        for shard in shards:  # load_file maps the file lazily; clone() makes the bytes land in process memory
            out.update({name: t.clone() for name, t in load_file(shard).items()})
        return out

    cold_shards, warm_shards = (lambda: evict(shards)), (lambda: warm(shards))
    cold_parts, warm_parts = (lambda: evict(partitions)), (lambda: warm(partitions))
    cases = [
        ("no I/O: allocate and first-touch fresh memory of the same size", fresh_memory, lambda: None),
        ("disk: 1 thread, 64 MiB O_DIRECT reads", lambda: disk_sequential(partitions), cold_parts),
        ("safetensors load_file + clone, cold", safetensors_materialised, cold_shards),
        ("safetensors load_file + clone, warm (page cache)", safetensors_materialised, warm_shards),
        ("reader.load_state_dict, O_DIRECT, checksums on", reader(True, True), cold_parts),
        ("reader.load_state_dict, O_DIRECT, checksums off", reader(True, False), cold_parts),
        ("reader.load_state_dict, buffered, cold, checksums off", reader(False, False), cold_parts),
        ("reader.load_state_dict, buffered, warm, checksums on", reader(False, True), warm_parts),
        ("reader.load_state_dict, buffered, warm, checksums off", reader(False, False), warm_parts),
        ("reader.load_state_dict into reused buffers, O_DIRECT, checksums on", reader_into_pool(True, True),
         cold_parts),
        ("reader.load_state_dict into reused buffers, O_DIRECT, checksums off", reader_into_pool(True, False),
         cold_parts),
        ("reader.load_state_dict into reused buffers, buffered, warm, checksums on", reader_into_pool(False, True),
         warm_parts),
        ("reader.load_state_dict into reused buffers, buffered, warm, checksums off",
         reader_into_pool(False, False), warm_parts),
    ]
    command = ["python", "-m", "tritonmoe.tools.bench_loader", *(sys.argv[1:] if argv is None else argv)]
    print(f"command: {' '.join(command)}")
    print(f"machine: {machine()}; checkpoint on {filesystem(converted)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"checkpoint: {size / 2**30:.2f} GiB, {len(index.tensors)} tensors, {len(index.experts)} experts, "
          f"{len(shards)} safetensors shards; reader threads={a.threads}, chunk={a.chunk_mb} MiB; best of {a.repeat}\n")
    print("| case | seconds | GB/s |\n| --- | --- | --- |")
    for label, fn, prepare in cases:
        seconds = timed(fn, a.repeat, prepare)
        print(f"| {label} | {seconds:.3f} | {size / seconds / 1e9:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
