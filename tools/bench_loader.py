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
import shutil
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
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark (issue 3 part 5) instead of the CPU one")
    p.add_argument("--gpu-check", action="store_true", help="only the GPU correctness check (tiny models)")
    p.add_argument("--shm-dir", default="/dev/shm/tritonmoe-bench", help="DRAM cache folder for --gpu")
    p.add_argument("--slots", type=int, default=16, help="pinned staging buffers for --gpu")
    p.add_argument("--partition-gb", type=int, default=2)
    p.add_argument("--skip-models", action="store_true", help="--gpu: skip the whole-model rows")
    p.add_argument("--only-service", action="store_true", help="--gpu: only the model and loader-service rows")
    p.add_argument("--json", type=Path, default=None, help="--gpu: also write the results here")
    p.add_argument("--plot", nargs=2, type=Path, metavar=("RESULTS_JSON", "PNG"),
                   help="only draw the chart of a --gpu run's --json results")
    p.add_argument("--memory", action="store_true",
                   help="host memory of a process loading the model: transformers vs reader vs the loader")
    p.add_argument("--memory-child", nargs=2, metavar=("CASE", "WHERE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child:
        memory_child(*a.memory_child)
        return 0
    if a.memory:
        return memory_main(a)
    if a.plot:
        plot(*a.plot)
        return 0
    if a.gpu_check:
        return gpu_check(a)
    if a.gpu:
        return gpu_main(a)

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



# ---- GPU benchmark (issue 3, part 5) ------------------------------------------------------------------------------
# python -m tritonmoe.tools.bench_loader --gpu --gb 9 --dir /tmp/bench-gpu --json results.json
#
# One run, one checkpoint: a real Mixtral config (so transformers can load it) with random bf16 weights in several
# safetensors shards, converted once. Every case loads every tensor onto cuda:0 and is timed with the GPU
# synchronised at the end; GB/s = tensor bytes / seconds. "cold": the page cache was dropped first
# (/proc/sys/vm/drop_caches as root, else posix_fadvise(DONTNEED) per file, said in the output); "warm": the files
# were read once just before. Our rows: the loader's DRAM cache (shared memory, mapped by the backend) to the GPU,
# and the checkpoint reader streaming partitions through a pinned ring to the GPU, from the page cache and cold.


def make_mixtral_checkpoint(folder: Path, gib: float, shards: int, layers: int | None = None) -> Path:
    """A Mixtral-architecture checkpoint of about ``gib`` GiB, random bf16, generated on the GPU when there is one."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    from transformers import MixtralConfig

    folder.mkdir(parents=True, exist_ok=True)
    hidden, ffn, experts, vocab = HIDDEN, EXPERT_FFN, EXPERTS, 32000
    per_layer = (4 * hidden * hidden + experts * 3 * hidden * ffn + experts * hidden + 2 * hidden) * 2
    layers = layers or max(1, round((gib * 2**30 - 2 * vocab * hidden * 2) / per_layer))
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=8, num_local_experts=experts,
                        num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
                        dtype="bfloat16")
    cfg.save_pretrained(folder)
    tensors = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
               "model.norm.weight": (hidden,)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}.self_attn.{proj}.weight"] = (hidden, hidden)
        tensors[f"{p}.input_layernorm.weight"] = (hidden,)
        tensors[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        tensors[f"{p}.block_sparse_moe.gate.weight"] = (experts, hidden)
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors[f"{q}.w1.weight"] = (ffn, hidden)
            tensors[f"{q}.w2.weight"] = (hidden, ffn)
            tensors[f"{q}.w3.weight"] = (ffn, hidden)
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        # small values (not random bits): no NaN/Inf, so a forward pass of the loaded model is meaningful
        save_file({n: (torch.randn(tensors[n], device=gen_device, dtype=torch.bfloat16) * 0.02).cpu()
                   for n in part}, folder / file)
        weight_map |= {n: file for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def drop_caches(files: list[Path]) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        evict(files)
        return "fadvise"


def ensure_shm(path: Path, need: int) -> Path:
    """``path`` if its filesystem has room for ``need`` bytes; containers often give /dev/shm only 64 MiB, so
    else a tmpfs of our own is mounted (root) and used instead."""
    path.mkdir(parents=True, exist_ok=True)
    from tritonmoe.loader.dram_cache import free_bytes

    if free_bytes(path) > need * 1.1:
        return path
    mnt = Path("/mnt/tritonmoe-shm")
    mnt.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mnt) and free_bytes(mnt) > need * 1.1:
        return mnt
    size_gb = int(need * 1.2 / 1e9) + 2
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_gb}g", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    print(f"{path} has {free_bytes(path) / 1e9:.1f} GB free, {need / 1e9:.1f} needed: mount tmpfs on {mnt}: "
          f"{'ok' if r.returncode == 0 else r.stderr.strip()}")
    return mnt if r.returncode == 0 else path


def gpu_main(a) -> int:
    import gc
    import statistics

    from tritonmoe.loader import dram_cache
    from tritonmoe.loader.client import ShmCheckpoint
    from tritonmoe.loader.device_copy import stream_reader_to_device
    from tritonmoe.loader.hf_model import load_hf_model_from_shm

    dev = torch.device("cuda:0")
    t_prep = time.perf_counter()
    hf = make_mixtral_checkpoint(a.dir / "hf", a.gb, a.shards)
    converted = convert(hf, a.dir / "converted", progress=False, partition_bytes=a.partition_gb << 30).dest
    index = read_index(converted)
    size = sum(t.bytes for t in index.tensors.values())
    shards = sorted(hf.glob("*.safetensors"))
    partitions = [converted / partition_file_name(i) for i in range(len(index.partitions))]
    shm = ensure_shm(Path(a.shm_dir), index.total_bytes)
    prep_s = time.perf_counter() - t_prep
    all_files = shards + partitions
    results: list[dict] = []
    how_cold = {"mode": "?"}

    def cold():
        how_cold["mode"] = drop_caches(all_files)

    def warm_all(files):
        return lambda: warm(files)

    def record(case, group, seconds, note=""):
        results.append({"case": case, "group": group, "seconds": seconds, "gbps": size / seconds / 1e9,
                        "note": note})
        print(f"| {case} | {seconds:.3f} | {size / seconds / 1e9:.2f} | {note} |", flush=True)

    def run_case(case, group, fn, prepare, repeat, note=""):
        times = []
        try:
            for _ in range(repeat):
                prepare()
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                del out
                gc.collect()
                torch.cuda.empty_cache()
        except Exception as e:  # one broken peer must not cost the whole run
            print(f"| {case} | failed | | {type(e).__name__}: {str(e)[:200]} |", flush=True)
            results.append({"case": case, "group": group, "error": f"{type(e).__name__}: {e}"})
            return
        record(case, group, min(times), note + (f" best of {repeat}" if repeat > 1 else ""))

    # -- ceilings
    def host_to_gpu_pinned():
        src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return 5 * (1 << 30) / (time.perf_counter() - t) / 1e9

    def dd(direct: bool) -> float:
        t = time.perf_counter()
        for path in partitions:
            subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M"] + (["iflag=direct"] if direct else []),
                           check=True, capture_output=True)
        return time.perf_counter() - t

    # -- our loader
    def shm_fill():
        target = shm / "bench"
        dram_cache.remove(target)
        return dram_cache.fill(converted, target, threads=a.threads, chunk_bytes=a.chunk_mb << 20, verify=False)

    def reader_stream(direct: bool):
        def run():
            with CheckpointReader(converted, direct=direct, threads=a.threads, chunk_bytes=a.chunk_mb << 20) as r:
                return stream_reader_to_device(r, dev, chunk_bytes=a.chunk_mb << 20, slots=a.slots)
        return run

    def shm_staged(threads):
        def run():
            with ShmCheckpoint(shm / "bench") as ck:
                return ck.to_device(dev, method="staged", threads=threads)
        return run

    held = {}

    def shm_fresh():  # a new backend process: map, page-lock in place (pipelined with the copies), copy
        ck = ShmCheckpoint(shm / "bench")
        out = ck.to_device(dev, method="pinned")
        held["ck"] = ck
        return out

    def shm_registered():  # the same mapping, already page-locked (steady state of a backend)
        return held["ck"].to_device(dev, method="pinned")

    # -- peers
    from safetensors.torch import load_file as st_load

    def safetensors_cuda():
        out = {}
        for s in shards:
            out.update(st_load(s, device="cuda:0"))
        return out

    def runai():
        from runai_model_streamer import SafetensorsStreamer

        out = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files([str(s) for s in shards])
            for name, t in streamer.get_tensors():
                out[name] = t.to(dev, non_blocking=True)
        return out

    def fastsafe():
        from fastsafetensors import fastsafe_open

        out = {}
        with fastsafe_open([str(s) for s in shards], device="cuda:0", nogds=True) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out

    def hf_from_pretrained():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16, device_map="cuda:0")

    def ours_model():
        with ShmCheckpoint(shm / "bench") as ck:
            return load_hf_model_from_shm(ck, dev, torch.bfloat16)

    command = ["python", "-m", "tritonmoe.tools.bench_loader", *sys.argv[1:]]
    print(f"command: {' '.join(command)}")
    print(f"machine: {machine()}; GPU {torch.cuda.get_device_name(0)}; torch {torch.__version__}; checkpoint on "
          f"{filesystem(converted)}, shm on {filesystem(shm)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"checkpoint: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB), {len(index.tensors)} tensors, "
          f"{len(index.experts)} experts, {len(shards)} safetensors shards, {len(partitions)} partitions; "
          f"threads={a.threads}, chunk={a.chunk_mb} MiB, ring={a.slots} slots; prepared in {prep_s:.1f} s\n")
    ceiling = host_to_gpu_pinned()
    print(f"host->GPU pinned ceiling (1 GiB copies): {ceiling:.1f} GB/s")
    print("| case | seconds | GB/s | note |\n| --- | --- | --- | --- |")

    def service_rows_and_json() -> int:
        """The loader-service rows (after the DRAM copy made here is removed), then the JSON file."""
        dram_cache.remove(shm / "bench")
        service_rows(a, converted, shm, size, run_case, record, dev)
        if a.json:
            a.json.write_text(json.dumps({"command": " ".join(command), "machine": machine(),
                                          "gpu": torch.cuda.get_device_name(0), "cold": how_cold["mode"],
                                          "bytes": size, "ceiling_gbps": ceiling, "results": results}, indent=1))
        return 0

    if a.only_service:  # a second run for the loader-service rows alone (same checkpoint, same machine)
        run_case("model: transformers from_pretrained(device_map=cuda), warm", "model", hf_from_pretrained,
                 warm_all(shards), 1)
        shm_fill()
        run_case("model: ours load_hf_model_from_shm(cuda), DRAM cache, staged", "model", ours_model,
                 lambda: None, 1)
        return service_rows_and_json()
    cold()
    record("disk: dd bs=64M iflag=direct, cold", "disk", dd(True), how_cold["mode"])
    cold()
    record("disk: dd bs=64M buffered, cold", "disk", dd(False), how_cold["mode"])
    cold()
    t = time.perf_counter()
    fill = shm_fill()
    record("ours: disk -> DRAM cache (shm), O_DIRECT, cold", "ours", time.perf_counter() - t,
           f"{'O_DIRECT' if fill.direct_io else 'buffered'}")
    run_case("ours: DRAM cache -> GPU, new process (map + page-lock pipelined + copy)", "ours", shm_fresh,
             lambda: None, 1)
    run_case("ours: DRAM cache -> GPU, pinned (registered)", "ours", shm_registered, lambda: None, 5)
    if "ck" in held:
        held.pop("ck").close()
    for threads in (8, 16):
        run_case(f"ours: DRAM cache -> GPU, staged (pread shm -> pinned ring, {threads} threads)", "ours",
                 shm_staged(threads), lambda: None, 3)
    run_case("ours: page cache -> GPU (reader, pinned ring)", "ours", reader_stream(False),
             warm_all(partitions), 3)
    run_case("ours: cold -> GPU (reader O_DIRECT, pinned ring)", "ours", reader_stream(True), cold, 1)
    run_case("safetensors load_file(device=cuda), warm", "peers", safetensors_cuda, warm_all(shards), 2)
    run_case("safetensors load_file(device=cuda), cold", "peers", safetensors_cuda, cold, 1)
    run_case("runai-model-streamer 0.16.1 (+ .to(cuda)), warm", "peers", runai, warm_all(shards), 2)
    run_case("runai-model-streamer 0.16.1 (+ .to(cuda)), cold", "peers", runai, cold, 1)
    run_case("fastsafetensors 0.5.0 (nogds), warm", "peers", fastsafe, warm_all(shards), 2)
    run_case("fastsafetensors 0.5.0 (nogds), cold", "peers", fastsafe, cold, 1)
    if not a.skip_models:
        run_case("model: transformers from_pretrained(device_map=cuda), warm", "model", hf_from_pretrained,
                 warm_all(shards), 1)
        run_case("model: ours load_hf_model_from_shm(cuda), DRAM cache", "model", ours_model, lambda: None, 1)
    return service_rows_and_json()


def service_rows(a, converted: Path, shm: Path, size: int, run_case, record, dev) -> None:
    """The real loader service (a subprocess started with --gpu-copy): its DRAM fill and page-locking, then this
    process -- a fresh backend -- has it copy the whole checkpoint into buffers allocated here (CUDA IPC)."""
    from tritonmoe.loader.hf_model import load_hf_model_from_shm

    log = open(a.dir / "loader-service.log", "w")
    proc, client = start_service(a.dir / "service", shm / "service", int(size * 1.5),
                                 ["--gpu-copy", "--threads", str(a.threads), "--chunk-mb", str(a.chunk_mb),
                                  "--no-verify"], log)
    try:
        client.register("bench", converted)
        evict([converted / partition_file_name(i) for i in range(len(read_index(converted).partitions))])
        t = time.perf_counter()
        st = client.load("bench")
        total = time.perf_counter() - t
        times = st["load_seconds"]
        record("service: disk -> DRAM cache, cold (fill only)", "service", times["dram_read"],
               "O_DIRECT" if st["direct_io"] else "buffered")
        record("service: page-lock the DRAM copy once (in the loader)", "service", times.get("pin", float("nan")),
               "")
        record("service: load request total (fill + pin + overhead)", "service", total, "")
        held = {}

        def ipc_copy():
            ck = client.ensure_loaded("bench")  # a hit: map + index
            held["ck"] = ck
            return ck.to_device(dev, method="loader")

        run_case("ours: DRAM cache -> GPU via the loader (CUDA IPC, page-locked once)", "ours", ipc_copy,
                 lambda: None, 5)

        def model_via_loader():
            with client.ensure_loaded("bench") as ck:
                return load_hf_model_from_shm(ck, dev, torch.bfloat16)

        if not a.skip_models:
            run_case("model: ours load_hf_model_from_shm(cuda) via the loader (IPC)", "model", model_via_loader,
                     lambda: None, 1)
        held.clear()
    except Exception as e:
        print(f"service rows failed: {type(e).__name__}: {e}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        print((a.dir / "loader-service.log").read_text()[-3000:], flush=True)
        shutil.rmtree(shm / "service", ignore_errors=True)


def start_service(root: Path, shm_dir: Path, dram_budget, extra: list[str], log=None):
    """A loader service with ``extra`` flags on a free loopback port, output to ``log`` (a file, DEVNULL, or None:
    this process's): (process, client), once it answers (or after a minute: the caller's first request then fails
    with the reason)."""
    from tritonmoe.loader.client import LoaderClient, LoaderError
    from tritonmoe.tools.tritonserver import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tritonmoe.loader.service", "--root", str(root), "--dram-budget",
                             str(dram_budget), "--disk-budget", "1GiB", "--port", str(port), "--shm-dir", str(shm_dir),
                             *extra], stdout=log, stderr=subprocess.STDOUT if log is not None else None)
    client = LoaderClient(f"http://127.0.0.1:{port}")
    for _ in range(600):
        try:
            client.health()
            break
        except LoaderError:
            time.sleep(0.1)
    return proc, client


def ipc_bits_equal(a, conv: Path, shm: Path, src: dict) -> bool:
    proc, client = start_service(a.dir / "check-svc", shm / "check-svc", "1GiB", ["--gpu-copy"])
    try:
        client.register("tiny", conv)
        with client.ensure_loaded("tiny") as ck:
            gpu = ck.to_device("cuda:0", method="loader")
            ok = all(gpu[n].cpu().reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8))
                     for n, t in src.items())
        print(f"gpu check: loader --gpu-copy (CUDA IPC) bits equal {ok}", flush=True)
        return ok
    except Exception as e:
        print(f"gpu check: loader --gpu-copy failed: {type(e).__name__}: {e}", flush=True)
        return False
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(shm / "check-svc", ignore_errors=True)


def plot(results_json: Path, out: Path) -> None:
    """A horizontal bar chart (GB/s) of a --gpu run's results, ours and the peers side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(results_json).read_text())
    rows = [r for r in doc["results"] if "gbps" in r and r["group"] != "service" and r["gbps"] == r["gbps"]]
    colors = {"disk": "#888888", "ours": "#1f77b4", "peers": "#ff7f0e", "model": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(rows) + 1.4))
    ax.barh(range(len(rows)), [r["gbps"] for r in rows], color=[colors.get(r["group"], "#333") for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["gbps"] + 0.4, i, f"{r['gbps']:.1f}", va="center", fontsize=8)
    ax.axvline(doc["ceiling_gbps"], color="k", ls="--", lw=0.8)
    ax.text(doc["ceiling_gbps"], -0.9, f"pinned H2D {doc['ceiling_gbps']:.0f} GB/s", fontsize=8, ha="right")
    ax.set_yticks(range(len(rows)), [r["case"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s to cuda:0 (higher is better)")
    ax.set_title(f"{doc['bytes'] / 1e9:.1f} GB bf16 checkpoint onto {doc['gpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


# ---- host memory of a backend process (issue 3: "peak host memory ... report it") --------------------------------
def smaps_rollup() -> dict[str, int]:
    """This process's memory by kind (bytes): /proc/self/smaps_rollup."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def memory_child(case: str, where: str) -> None:
    """Load the model one way in this (fresh) process, print one JSON line of memory figures."""
    import resource

    from tritonmoe.loader.client import LoaderClient
    from tritonmoe.loader.hf_model import load_hf_model, load_hf_model_from_shm

    start = time.perf_counter()
    if case == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.bfloat16)
    elif case == "reader":
        model = load_hf_model(where, "cpu", torch.bfloat16)
    else:
        url, name = where.rsplit("/", 1)
        ckpt = LoaderClient(url).ensure_loaded(name)
        model = load_hf_model_from_shm(ckpt, "cpu", torch.bfloat16)
    seconds = time.perf_counter() - start
    sm = smaps_rollup()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"case": case, "seconds": seconds, "model_bytes": params,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      # anonymous = the process's own memory; file pages (safetensors mmap, the shared-memory
                      # DRAM cache) are counted apart: they belong to the page cache / tmpfs, not to the process
                      "rss": sm["Rss"], "anon": sm["Anonymous"], "file": sm["Rss"] - sm["Anonymous"]}), flush=True)


def memory_main(a) -> int:
    hf = make_mixtral_checkpoint(a.dir / "hf-mixtral", a.gb, a.shards)
    converted = convert(hf, a.dir / "converted-mixtral", progress=False).dest
    size = read_index(converted).total_bytes
    shm = Path(a.shm_dir) / "memory"
    proc, client = start_service(a.dir / "mem-svc", shm, 2 * size, [], subprocess.DEVNULL)
    rows = []
    try:
        client.register("m", converted)
        client.load("m")
        for case, where in (("transformers", hf), ("reader", converted), ("loader", f"{client.url}/m")):
            out = subprocess.run([sys.executable, "-m", "tritonmoe.tools.bench_loader", "--memory-child", case,
                                  str(where)], capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(shm, ignore_errors=True)
    command = ["python", "-m", "tritonmoe.tools.bench_loader", *sys.argv[1:]]
    print(f"command: {' '.join(command)}\nmachine: {machine()}\n"
          f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
          f"checkpoint: {size / 1e9:.2f} GB bf16 Mixtral config; model built on the CPU in bf16, each way in a fresh "
          "process\n")
    print("| how | seconds | peak RSS GB | after load: anonymous GB | file/shm-backed GB | model GB |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['seconds']:.2f} | {r['peak_rss'] / 1e9:.2f} | {r['anon'] / 1e9:.2f} | "
              f"{r['file'] / 1e9:.2f} | {r['model_bytes'] / 1e9:.2f} |")
    return 0


def gpu_check(a) -> int:
    """Correctness on the GPU: greedy tokens of a tiny model loaded through the DRAM-cache path on cuda equal
    transformers' own, and every tensor copied to the GPU equals its safetensors source bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tritonmoe.loader import dram_cache
    from tritonmoe.loader.client import ShmCheckpoint
    from tritonmoe.loader.hf_model import load_hf_model_from_shm
    from tritonmoe.tools.tiny_models import TinySpec, build

    root = a.dir / "check"
    shm = ensure_shm(Path(a.shm_dir), 1 << 30)
    ok = True
    for arch, dtype in (("mixtral", torch.float32), ("qwen3_moe", torch.bfloat16)):
        hf = build(TinySpec(arch=arch, layers=2), root / arch)
        conv = convert(hf, root / f"{arch}-converted", progress=False).dest
        dram_cache.remove(shm / arch)
        dram_cache.fill(conv, shm / arch, threads=4, chunk_bytes=1 << 20)
        tok = AutoTokenizer.from_pretrained(hf)
        ids = tok("def fibonacci(n):", return_tensors="pt").input_ids.cuda()
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype).cuda().eval()
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)
        with ShmCheckpoint(shm / arch) as ck:
            src = {}
            for f in hf.glob("*.safetensors"):
                src.update(load_file(f))
            bits = True
            for method in ("staged", "pinned"):
                gpu = ck.to_device("cuda:0", method=method)
                bits &= all(gpu[n].cpu().reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8))
                            for n, t in src.items())
                del gpu
            model = load_hf_model_from_shm(ck, "cuda:0", dtype).eval()
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
            off = load_hf_model_from_shm(ck, "cuda:0", dtype, experts_device="cpu")
            placement = {p.device.type for n, p in off.named_parameters() if "experts" in n} == {"cpu"} and \
                {p.device.type for n, p in off.named_parameters() if "experts" not in n} == {"cuda"}
        if arch == "mixtral":  # the loader service copying through CUDA IPC gives the same bytes
            bits &= ipc_bits_equal(a, conv, shm, src)
        same = torch.equal(want, got)
        print(f"gpu check {arch} {dtype}: bits equal {bits}, greedy tokens equal {same}, experts_device=cpu "
              f"placement {placement}")
        ok &= bits and same and placement
        dram_cache.remove(shm / arch)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
