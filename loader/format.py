"""The tritonmoe checkpoint format: its constants, index records, and the checks an index must pass.

A converted checkpoint is a folder::

    tritonmoe_index.json      the index (this module), written last: a folder without it is unfinished
    partition-00000.bin ...   raw tensor bytes, every tensor at a 4 KiB-aligned offset, files padded to 4 KiB
    config.json, tokenizer.json, ...   every non-weight file of the source folder, copied unchanged

docs/loader.md is the full specification; this module is its executable form.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_NAME = "tritonmoe-checkpoint"
FORMAT_VERSION = 1
INDEX_FILE = "tritonmoe_index.json"
ALIGNMENT = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the device block (<= 4 KiB)
CHECKSUM_ALGORITHM = "xxh3_64"

# safetensors dtype code -> (torch dtype name, bytes per element). Names are torch's, so the reader maps a name
# straight to `getattr(torch, name)`.
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "C64": ("complex64", 8),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
DTYPE_ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}


class CheckpointError(Exception):
    """A checkpoint (source or converted) is missing, malformed, or does not match its index."""


class ChecksumError(CheckpointError):
    """A tensor's bytes do not hash to the checksum its index records."""

    def __init__(self, tensor: str, expected: str, actual: str, where: str):
        super().__init__(f"checksum mismatch for tensor {tensor!r} in {where}: index says {expected}, "
                         f"data hashes to {actual}; the checkpoint is corrupt, reconvert it")
        self.tensor = tensor


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def partition_file_name(number: int) -> str:
    return f"partition-{number:05d}.bin"


def contiguous_stride(shape: list[int]) -> list[int]:
    stride, step = [], 1
    for dim in reversed(shape):
        stride.append(step)
        step *= dim
    return stride[::-1]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``bytes`` bytes at ``offset`` of partition ``partition``."""

    partition: int
    offset: int
    bytes: int
    shape: list[int]
    stride: list[int]
    dtype: str
    checksum: str


@dataclass(frozen=True)
class ExpertEntry:
    """One routed expert: all its tensors lie in ``bytes`` contiguous bytes from ``offset``, so one copy moves it.

    ``module`` is the experts container (``model.layers.3.mlp.experts``); ``layer`` is the first integer in it."""

    module: str
    layer: int
    expert: int
    partition: int
    offset: int
    bytes: int
    tensors: list[str]


@dataclass
class CheckpointIndex:
    tensors: dict[str, TensorEntry]
    experts: list[ExpertEntry]
    partitions: list[int]  # byte size of each partition file, a multiple of ALIGNMENT
    fingerprint: str  # identity of the model: hash of every tensor's name, dtype, shape, checksum and the side files
    source: dict = field(default_factory=dict)  # where it was converted from, and the source files' stat signature
    side_files: list[str] = field(default_factory=list)  # non-weight files copied beside the partitions

    def expert(self, layer: int, expert: int, module: str | None = None) -> ExpertEntry:
        """The entry of ``expert`` in ``layer`` (give ``module`` where two containers share a layer number)."""
        found = [e for e in self.experts
                 if e.layer == layer and e.expert == expert and (module is None or e.module == module)]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} (pass module=)"
            raise KeyError(f"{what} expert {expert} in layer {layer}"
                           + (f" of {module}" if module else ""))
        return found[0]

    @property
    def total_bytes(self) -> int:
        return sum(self.partitions)

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "alignment": ALIGNMENT,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "side_files": self.side_files,
            "partitions": [{"file": partition_file_name(i), "bytes": n} for i, n in enumerate(self.partitions)],
            "tensors": {name: asdict(entry) for name, entry in self.tensors.items()},
            "experts": [asdict(entry) for entry in self.experts],
        }
        return json.dumps(doc, separators=(",", ":"))  # compact: large models have ~10^5 tensors

    @classmethod
    def from_json(cls, text: str, where: str = INDEX_FILE) -> "CheckpointIndex":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise CheckpointError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where} is not a {FORMAT_NAME} index")
        if doc.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{where} has format version {doc.get('format_version')!r}; this reader "
                                  f"reads version {FORMAT_VERSION}: reconvert the model")
        if doc.get("alignment") != ALIGNMENT or doc.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
            raise CheckpointError(f"{where}: unsupported alignment or checksum algorithm")
        try:
            partitions = doc["partitions"]
            if [p["file"] for p in partitions] != [partition_file_name(i) for i in range(len(partitions))]:
                raise CheckpointError(f"{where}: partition files must be numbered from 0 without gaps")
            index = cls(
                tensors={name: TensorEntry(**entry) for name, entry in doc["tensors"].items()},
                experts=[ExpertEntry(**entry) for entry in doc["experts"]],
                partitions=[int(p["bytes"]) for p in partitions],
                fingerprint=doc["fingerprint"],
                source=doc.get("source", {}),
                side_files=doc.get("side_files", []),
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where} is missing or mistypes a field: {e!r}") from None
        validate_index(index, where)
        return index


def validate_index(index: CheckpointIndex, where: str = INDEX_FILE) -> None:
    """Check that the index is self-consistent: sizes match shapes, ranges are aligned, inside their partition,
    and disjoint, and each expert's range covers exactly its tensors. Raises CheckpointError naming the entry."""
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for name, t in index.tensors.items():
        if t.dtype not in DTYPE_ITEMSIZE:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {t.dtype!r}")
        if len(t.stride) != len(t.shape) or any(d < 0 for d in t.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed shape/stride")
        expected = math.prod(t.shape) * DTYPE_ITEMSIZE[t.dtype]
        if t.bytes != expected:
            raise CheckpointError(f"{where}: tensor {name!r} records {t.bytes} bytes but shape {t.shape} of "
                                  f"{t.dtype} needs {expected}")
        if not 0 <= t.partition < len(index.partitions):
            raise CheckpointError(f"{where}: tensor {name!r} names partition {t.partition}, which does not exist")
        if t.offset % ALIGNMENT or t.offset < 0 or t.offset + t.bytes > index.partitions[t.partition]:
            raise CheckpointError(f"{where}: tensor {name!r} at offset {t.offset} (+{t.bytes} bytes) is unaligned or "
                                  f"outside {partition_file_name(t.partition)} ({index.partitions[t.partition]} bytes)")
        spans.setdefault(t.partition, []).append((t.offset, t.offset + t.bytes, name))
    for partition, ranges in spans.items():
        ranges.sort()
        for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
            if start < end:
                raise CheckpointError(f"{where}: tensors {a!r} and {b!r} overlap in {partition_file_name(partition)}")
    for size in index.partitions:
        if size % ALIGNMENT:
            raise CheckpointError(f"{where}: partition size {size} is not a multiple of {ALIGNMENT}")
    for e in index.experts:
        members = [index.tensors.get(n) for n in e.tensors]
        if not members or None in members:
            raise CheckpointError(f"{where}: expert {e.expert} of {e.module} lists unknown tensors")
        if e.offset % ALIGNMENT or any(m.partition != e.partition for m in members) or \
                min(m.offset for m in members) != e.offset or \
                max(m.offset + m.bytes for m in members) != e.offset + e.bytes:
            raise CheckpointError(f"{where}: expert {e.expert} of {e.module} does not cover exactly its tensors")


def read_index(folder: str | os.PathLike) -> CheckpointIndex:
    """Read and check ``folder``'s index (not yet against the partition files: the reader does that)."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a converted tritonmoe checkpoint (no {INDEX_FILE}); "
                              f"convert it with `tritonmoe-convert SRC {folder}`")
    return CheckpointIndex.from_json(path.read_text(), str(path))
