"""Read a Hugging Face checkpoint folder without decoding tensors: which tensors exist, where their raw bytes are.

safetensors files are `u64 header length | JSON header | raw data`; the header gives each tensor's dtype, shape
and byte range. The converter copies those bytes verbatim, which makes the round trip bit-exact by construction
for every dtype, fp8 included.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .format import SAFETENSORS_DTYPES, CheckpointError

SHARD_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Weight files of any format are not copied beside the converted partitions; everything else is.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
                   ".h5", ".msgpack", ".gguf", ".onnx")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    offset: int  # absolute offset of the first byte in ``file``
    bytes: int
    shape: list[int]
    dtype: str  # torch dtype name


@dataclass(frozen=True)
class HFSource:
    folder: Path
    tensors: list[SourceTensor]  # in file order
    weight_files: list[Path]
    side_files: list[Path]  # relative to folder

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    def signature(self) -> list:
        """Cheap identity of the source files (name, size, mtime): equal signatures mean an unchanged source."""
        out = []
        for path in sorted(self.weight_files + [self.folder / p for p in self.side_files]):
            st = path.stat()
            out.append([str(path.relative_to(self.folder)), st.st_size, st.st_mtime_ns])
        return out


def open_hf_folder(folder: str | os.PathLike) -> HFSource:
    """Parse ``folder``'s safetensors headers (sharded with an index, or a single file) and list its side files."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"source {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"source {folder} is not a folder (give the Hugging Face model folder)")
    weight_files = _weight_files(folder)
    tensors, seen = [], {}
    for file in weight_files:
        for t in read_safetensors_header(file):
            if t.name in seen:
                raise CheckpointError(f"tensor {t.name!r} appears in both {seen[t.name].name} and {file.name}")
            seen[t.name] = file
            tensors.append(t)
    index_path = folder / SHARD_INDEX
    if index_path.exists():
        listed = set(_read_shard_index(index_path))
        missing = listed - seen.keys()
        if missing:
            raise CheckpointError(f"{SHARD_INDEX} lists {len(missing)} tensors that no shard holds, "
                                  f"e.g. {sorted(missing)[0]!r}")
    side_files = sorted(p.relative_to(folder) for p in folder.rglob("*")
                        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return HFSource(folder, tensors, weight_files, side_files)


def _read_shard_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return weight_map
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors shard index: {e!r}") from None


def _weight_files(folder: Path) -> list[Path]:
    index_path = folder / SHARD_INDEX
    if index_path.exists():
        names = sorted(set(_read_shard_index(index_path).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{SHARD_INDEX} in {folder} names shard files that are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others
    if others:
        raise CheckpointError(f"{folder} holds several .safetensors files but no {SHARD_INDEX} saying how they "
                              "form one model")
    raise CheckpointError(f"no safetensors weights in {folder} (expected {SINGLE_FILE} or {SHARD_INDEX}); "
                          "convert .bin checkpoints to safetensors first")


def read_safetensors_header(file: Path) -> list[SourceTensor]:
    """Tensors of one safetensors file, checked against the file's size; CheckpointError if the header is corrupt."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"corrupt safetensors file {file}: only {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"corrupt safetensors file {file}: header length {header_len} does not fit "
                                  f"the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"corrupt safetensors file {file}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {file}: header is not a JSON object")
    data_start = 8 + header_len
    tensors = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {file}: malformed entry for {name!r}") from None
        if dtype_code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtype_code}, which tritonmoe does not support")
        dtype, itemsize = SAFETENSORS_DTYPES[dtype_code]
        if end - begin != math.prod(shape) * itemsize or begin < 0 or data_start + end > size:
            raise CheckpointError(f"corrupt safetensors file {file}: tensor {name!r} byte range [{begin}, {end}) "
                                  f"does not match shape {shape} of {dtype} or the file size ({size} bytes)")
        tensors.append(SourceTensor(name, file, data_start + begin, end - begin, list(shape), dtype))
    tensors.sort(key=lambda t: t.offset)
    return tensors
