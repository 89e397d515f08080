"""The running batch's KV cache: one left-padded transformers ``DynamicCache`` for all live sequences.

A new sequence is prefilled on its own and then merged in: both caches are left-padded to a common length and
concatenated along the batch dimension. Finished sequences are dropped by row, and columns that are padding in
every remaining row are trimmed, so the cache never grows past the longest live sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedCacheError(RuntimeError):
    pass


def _check_layers(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise UnsupportedCacheError(
                f"cache layer type {type(layer).__name__} (sliding-window or indexed attention) is not supported "
                "by continuous batching yet")


def check_supported(config) -> None:
    """Refuse, before any request, a model whose cache the running batch cannot hold (sliding-window layers, ...):
    the cache transformers would build for ``config``, checked layer by layer."""
    _check_layers(DynamicCache(config=config))


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if n == 0 else F.pad(t, (0, 0, n, 0))  # [B, H, T, D]: pad T on the left


class KVBatch:
    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []  # real tokens per row; row b occupies the last lengths[b] columns

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def add(self, cache: DynamicCache, length: int) -> None:
        """Append a prefilled single-sequence cache as the last row."""
        _check_layers(cache)
        if self.cache is None:
            self.cache, self.lengths = cache, [length]
            return
        width = max(self.width, length)
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width - self.width), _left_pad(new.keys, width - length)])
            mine.values = torch.cat([_left_pad(mine.values, width - self.width),
                                     _left_pad(new.values, width - length)])
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); trim columns no remaining row uses."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        old_width = self.width
        self.lengths = [self.lengths[r] for r in rows]
        trim = old_width - self.width
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., trim:, :]
            layer.values = layer.values.index_select(0, index)[..., trim:, :]

    def step_inputs(self, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Attention mask [B, width + 1] and position ids [B, 1] for one decode step; call ``advance`` after.
        Without padding (one sequence, or all of one length) the mask is None: attention then needs no mask,
        which spares transformers building a 4-D one every step."""
        width = self.width
        lengths = torch.tensor(self.lengths, device=device)
        if min(self.lengths) == width:
            return None, lengths[:, None]
        columns = torch.arange(width + 1, device=device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]
