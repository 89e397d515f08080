"""Where each tensor goes: which tensors form an expert, in what order tensors are stored, and at which offset.

Order: non-expert tensors first (they are needed before the first token, and read in one sweep), then the routed
experts layer by layer, each expert's tensors back to back. A "unit" is what must stay contiguous: one non-expert
tensor, or all tensors of one expert. Units are never split across partitions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .format import ALIGNMENT, align_up

# `<container>.experts.<n>.<rest>`; Switch/NLLB spell the expert `expert_<n>`. Shared experts (`shared_experts.`,
# `shared_expert.`) do not match: the dot before `experts` is required.
_EXPERT_KEY = re.compile(r"^(?P<module>(?:.*\.)?experts)\.(?:expert_)?(?P<expert>\d+)\.(?P<rest>.+)$")
_INTEGER_COMPONENT = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
DEFAULT_PARTITION_BYTES = 2 << 30  # large enough for long sequential reads, small enough for parallel downloads


@dataclass(frozen=True)
class ExpertKey:
    module: str  # e.g. "model.layers.3.mlp.experts"
    layer: int  # first integer component of module; -1 when it has none
    expert: int


def expert_of(tensor_name: str) -> ExpertKey | None:
    """The routed expert ``tensor_name`` belongs to, or None for a non-expert tensor."""
    m = _EXPERT_KEY.match(tensor_name)
    if not m:
        return None
    layer = _INTEGER_COMPONENT.search(m["module"])
    return ExpertKey(m["module"], int(layer[1]) if layer else -1, int(m["expert"]))


def natural_key(name: str) -> list:
    """Sort key that puts `layers.2` before `layers.10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def group_units(tensor_names: list[str]) -> tuple[list[list[str]], dict[ExpertKey, list[str]]]:
    """Split names into storage units in storage order; also return each expert's tensor list."""
    experts: dict[ExpertKey, list[str]] = {}
    plain = []
    for name in tensor_names:
        key = expert_of(name)
        if key is None:
            plain.append(name)
        else:
            experts.setdefault(key, []).append(name)
    for names in experts.values():
        names.sort(key=natural_key)
    ordered_experts = sorted(experts, key=lambda k: (k.layer, natural_key(k.module), k.expert))
    units = [[n] for n in sorted(plain, key=natural_key)] + [experts[k] for k in ordered_experts]
    return units, {k: experts[k] for k in ordered_experts}


@dataclass(frozen=True)
class Placement:
    partition: int
    offset: int


def plan_layout(units: list[list[tuple[str, int]]], partition_bytes: int = DEFAULT_PARTITION_BYTES,
                alignment: int = ALIGNMENT) -> tuple[dict[str, Placement], list[int]]:
    """Place ``units`` (lists of (tensor name, byte size)) in order into partitions.

    Every tensor starts at an ``alignment`` multiple, so each tensor and each unit can be read with O_DIRECT and
    a unit's tensors are adjacent up to padding. A new partition starts when the next unit would overflow
    ``partition_bytes`` (a unit larger than that gets a partition of its own). Returns the placements and the
    size of each partition, padded to ``alignment``."""
    placements: dict[str, Placement] = {}
    sizes: list[int] = []
    cursor = 0
    for unit in units:
        unit_bytes = sum(align_up(n, alignment) for _, n in unit)
        if not sizes or (cursor > 0 and cursor + unit_bytes > partition_bytes):
            if sizes:
                sizes[-1] = cursor
            sizes.append(0)
            cursor = 0
        for name, nbytes in unit:
            placements[name] = Placement(len(sizes) - 1, cursor)
            cursor += align_up(nbytes, alignment)
    if sizes:
        sizes[-1] = cursor
    return placements, sizes
