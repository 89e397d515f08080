"""The running batch's KV cache: one left-padded transformers ``DynamicCache`` for all live sequences.

A new sequence is prefilled on its own and then merged in: both caches are left-padded to a common length and
concatenated along the batch dimension. Finished sequences are dropped by row, and columns that are padding in
every remaining row are trimmed, so the cache never grows past the longest live sequence.

Sliding-window layers (``DynamicSlidingWindowLayer``: GPT-OSS, Mistral-style windows) keep only their last
``window - 1`` columns. Rows are right-aligned in one column space (the batch's width), so a sliding layer holds the
last ``min(width, window - 1)`` columns of it, left-padded the same way, and its ``cumulative_length`` is the
batch's width: transformers then places the window and slices the padding mask in those columns, where a
column distance is a token distance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class UnsupportedCacheError(RuntimeError):
    pass


def _check_layers(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise UnsupportedCacheError(
                f"cache layer type {type(layer).__name__} (chunked, quantized or indexed attention) is not "
                "supported by continuous batching yet")


def _kept(layer, width: int) -> int:
    """Columns ``layer`` holds when the batch is ``width`` wide."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        return min(width, layer.sliding_window - 1)
    return width


def _set_width(layer, width: int) -> None:
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = width


def check_supported(config) -> None:
    """Refuse, before any request, a model whose cache the running batch cannot hold (chunked, quantized or
    indexed attention layers): the cache transformers would build for ``config``, checked layer by layer."""
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
            target = _kept(mine, width)
            pad_mine, pad_new = target - mine.keys.shape[-2], target - new.keys.shape[-2]
            mine.keys = torch.cat([_left_pad(mine.keys, pad_mine), _left_pad(new.keys, pad_new)])
            mine.values = torch.cat([_left_pad(mine.values, pad_mine), _left_pad(new.values, pad_new)])
            _set_width(mine, width)
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); trim columns no remaining row uses."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        self.lengths = [self.lengths[r] for r in rows]
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            trim = layer.keys.shape[-2] - _kept(layer, self.width)
            layer.keys = layer.keys.index_select(0, index)[..., trim:, :]
            layer.values = layer.values.index_select(0, index)[..., trim:, :]
            _set_width(layer, self.width)

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
