"""Convert a Hugging Face safetensors checkpoint folder into the tritonmoe format.

    tritonmoe-convert SRC DST [--force] [--partition-gb 2] [--no-verify] [--quiet]

Raw tensor bytes are copied verbatim (bit-exact for every dtype), hashed on the way, laid out by layout.py, and
re-read and checked before the result appears. The output is built in a hidden sibling folder and renamed to DST
only when complete and verified, so an interrupted or failed conversion (a full disk, say) never leaves a DST
that looks complete. DST holding another model is never replaced without --force; holding the same model, the
conversion is a no-op.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import xxhash
from tqdm import tqdm

from .format import (INDEX_FILE, CheckpointError, CheckpointIndex, ExpertEntry, TensorEntry, contiguous_stride,
                     partition_file_name, read_index)
from .hf_source import HFSource, SourceTensor, open_hf_folder
from .layout import DEFAULT_PARTITION_BYTES, group_units, plan_layout
from .reader import CheckpointReader

COPY_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ConversionResult:
    dest: Path
    converted: bool  # False: DST already held this model and nothing was written
    index: CheckpointIndex


class PartitionWriter:
    """Appends to one partition file, padding with zeros up to aligned offsets."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self.position = 0

    def write(self, data) -> None:
        self._file.write(data)
        self.position += len(data)

    def pad_to(self, offset: int) -> None:
        if offset < self.position:
            raise AssertionError(f"layout goes backwards in {self.path}: {offset} < {self.position}")
        if offset > self.position:
            self.write(bytes(offset - self.position))

    def finish(self, size: int) -> None:
        self.pad_to(size)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abandon(self) -> None:
        self._file.close()


def convert(source: str | os.PathLike, dest: str | os.PathLike, *, force: bool = False,
            partition_bytes: int = DEFAULT_PARTITION_BYTES, verify: bool = True,
            progress: bool = True) -> ConversionResult:
    """Convert the HF folder ``source`` into ``dest``. See the module docstring for the guarantees.

    Raises CheckpointError for a missing or corrupt source and FileExistsError when ``dest`` holds something
    else (another model without ``force``, or a folder that is not a tritonmoe checkpoint)."""
    src = open_hf_folder(source)
    dest = Path(dest).absolute()
    if dest == src.folder.absolute() or src.folder.absolute() in dest.parents:
        raise CheckpointError(f"destination {dest} must not be the source folder or inside it")
    existing = _existing_checkpoint(dest)
    if existing is not None and not force:
        if existing.source.get("signature") == src.signature():
            return ConversionResult(dest, False, existing)
        checksums = _hash_source(src, progress)  # the files changed on disk: compare contents, not dates
        if model_fingerprint(src, checksums) == existing.fingerprint:
            return ConversionResult(dest, False, existing)
        raise FileExistsError(f"{dest} holds a different model (fingerprint {existing.fingerprint}); pass "
                              f"--force to replace it, or choose another destination")
    staging = dest.parent / f".{dest.name}.converting-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        index = _write_checkpoint(src, staging, partition_bytes, progress)
        if verify:
            with CheckpointReader(staging) as reader:
                reader.verify()
        _publish(staging, dest)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device while converting into {dest}; the partial "
                                        f"output was removed and {dest} was left as it was") from e
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConversionResult(dest, True, index)


def _existing_checkpoint(dest: Path) -> CheckpointIndex | None:
    """The index already at ``dest``; None when there is nothing to protect (missing or empty folder)."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        raise FileExistsError(f"destination {dest} exists and is not a folder")
    if not any(dest.iterdir()):
        return None
    if not (dest / INDEX_FILE).is_file():
        raise FileExistsError(f"destination {dest} is a non-empty folder that is not a tritonmoe checkpoint; "
                              "refusing to replace it (choose an empty or new folder)")
    return read_index(dest)


def _source_chunks(tensor: SourceTensor, fd: int):
    """The tensor's bytes from the source file, in COPY_CHUNK_BYTES pieces."""
    for start in range(0, tensor.bytes, COPY_CHUNK_BYTES):
        length = min(COPY_CHUNK_BYTES, tensor.bytes - start)
        chunk = os.pread(fd, length, tensor.offset + start)
        if len(chunk) != length:
            raise CheckpointError(f"{tensor.file} ended while reading tensor {tensor.name!r}: the file is truncated")
        yield chunk


class _SourceFiles:
    """The source's weight files, each opened once."""

    def __init__(self, src: HFSource):
        self._fds = {path: os.open(path, os.O_RDONLY) for path in src.weight_files}

    def fd(self, tensor: SourceTensor) -> int:
        return self._fds[tensor.file]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self._fds.values():
            os.close(fd)


def _hash_source(src: HFSource, progress: bool) -> dict[str, str]:
    bar = tqdm(total=src.total_bytes, unit="B", unit_scale=True, desc="hashing source", disable=not progress)
    checksums = {}
    with bar, _SourceFiles(src) as files:
        for t in src.tensors:
            hasher = xxhash.xxh3_64()
            for chunk in _source_chunks(t, files.fd(t)):
                hasher.update(chunk)
                bar.update(len(chunk))
            checksums[t.name] = hasher.hexdigest()
    return checksums


def model_fingerprint(src: HFSource, checksums: dict[str, str]) -> str:
    """Identity of a model: every tensor's name, dtype, shape and checksum, and every side file's contents."""
    tensors = sorted([t.name, t.dtype, t.shape, checksums[t.name]] for t in src.tensors)
    side = [[str(p), xxhash.xxh3_64_hexdigest((src.folder / p).read_bytes())] for p in src.side_files]
    return xxhash.xxh3_64_hexdigest(json.dumps([tensors, side]).encode())


def _write_checkpoint(src: HFSource, out: Path, partition_bytes: int, progress: bool) -> CheckpointIndex:
    by_name = {t.name: t for t in src.tensors}
    units, experts = group_units(list(by_name))
    placements, sizes = plan_layout([[(n, by_name[n].bytes) for n in unit] for unit in units], partition_bytes)
    checksums: dict[str, str] = {}
    bar = tqdm(total=src.total_bytes, unit="B", unit_scale=True, desc=f"converting {src.folder.name}",
               disable=not progress)
    with bar, _SourceFiles(src) as files:
        writer, current = None, -1
        try:
            for name in (n for unit in units for n in unit):
                place = placements[name]
                if place.partition != current:
                    if writer is not None:
                        writer.finish(sizes[current])
                    current = place.partition
                    writer = PartitionWriter(out / partition_file_name(current))
                writer.pad_to(place.offset)
                hasher = xxhash.xxh3_64()
                for chunk in _source_chunks(by_name[name], files.fd(by_name[name])):
                    hasher.update(chunk)
                    writer.write(chunk)
                    bar.update(len(chunk))
                checksums[name] = hasher.hexdigest()
            if writer is not None:
                writer.finish(sizes[-1])
                writer = None
        finally:
            if writer is not None:
                writer.abandon()
    for rel in src.side_files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src.folder / rel, out / rel)
    tensors = {}
    for name in (n for unit in units for n in unit):
        t, place = by_name[name], placements[name]
        tensors[name] = TensorEntry(place.partition, place.offset, t.bytes, t.shape, contiguous_stride(t.shape),
                                    t.dtype, checksums[name])
    expert_entries = []
    for key, names in experts.items():
        first, last = tensors[names[0]], tensors[names[-1]]
        expert_entries.append(ExpertEntry(key.module, key.layer, key.expert, first.partition, first.offset,
                                           last.offset + last.bytes - first.offset, names))
    index = CheckpointIndex(tensors=tensors, experts=expert_entries, partitions=sizes,
                            fingerprint=model_fingerprint(src, checksums),
                            source={"path": str(src.folder.absolute()), "signature": src.signature()},
                            side_files=[str(p) for p in src.side_files])
    _write_durably(out / INDEX_FILE, index.to_json())  # last: its presence marks a complete checkpoint
    return index


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staging: Path, dest: Path) -> None:
    """Move the finished ``staging`` folder to ``dest``, replacing what is there (an empty folder or, with
    --force, an older checkpoint). DST is never a mix of the two."""
    _fsync_dir(staging)
    if dest.exists() and any(dest.iterdir()):
        retired = dest.parent / f".{dest.name}.replaced-{secrets.token_hex(4)}"
        os.rename(dest, retired)
        os.rename(staging, dest)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, dest)  # rename(2) may replace an empty directory
    _fsync_dir(dest.parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tritonmoe-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="Hugging Face model folder (sharded or single-file safetensors)")
    p.add_argument("dest", help="output folder (created; must be new, empty, or hold a tritonmoe checkpoint)")
    p.add_argument("--force", action="store_true", help="replace a different model already converted in DEST, "
                                                        "or reconvert the same one")
    p.add_argument("--partition-gb", type=float, default=DEFAULT_PARTITION_BYTES / 2**30,
                   help="largest partition file, GiB (default %(default)s)")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading and checking the result")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        result = convert(a.source, a.dest, force=a.force, partition_bytes=int(a.partition_gb * 2**30),
                         verify=not a.no_verify, progress=not a.quiet)
    except (CheckpointError, OSError) as e:  # FileExistsError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return 2
    index = result.index
    if result.converted:
        print(f"converted {a.source} -> {result.dest}: {len(index.tensors)} tensors, {len(index.experts)} experts, "
              f"{len(index.partitions)} partitions, {index.total_bytes / 2**30:.2f} GiB")
    else:
        print(f"{result.dest} already holds this model (fingerprint {index.fingerprint}); nothing to do "
              "(--force reconverts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
