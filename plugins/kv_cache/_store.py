"""Storage shared by the layers that compute their own attention (quest, duo, adakv): a growable K/V buffer written
in place, the pad-aware positions of a step's new tokens, grouped-query attention with a per-head boolean mask, and
the cache-layer bookkeeping (`OwnLayer`; `BufferedLayer` for the layers that keep their K/V in a `GrowBuffer`).

`GrowBuffer` keeps [B, H, capacity, D] and writes each step's tokens into the next slots: a decode step costs one
small copy, not the full-cache `torch.cat` of transformers' DynamicLayer (which reads and writes the whole cache
every step). Capacity grows by an eighth (rounded to `align` slots), so copies amortise to O(1) per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from hf_accel.errors import AccelError


class GrowBuffer:
    def __init__(self, align: int = 128):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0
        self.align = align

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = k.shape[2]
        if self.k is None or self.n + q > self.k.shape[2]:
            need = self.n + q
            cap = self.align * math.ceil((need + max(self.align, need // 8)) / self.align)
            b, h, _, d = k.shape
            nk = k.new_zeros(b, h, cap, d)  # zeros: masked slots still enter matmuls with weight 0 (0 * NaN = NaN)
            nv = v.new_zeros(b, h, cap, v.shape[-1])
            if self.k is not None:
                nk[:, :, : self.n] = self.k[:, :, : self.n]
                nv[:, :, : self.n] = self.v[:, :, : self.n]
            self.k, self.v = nk, nv
        self.k[:, :, self.n:self.n + q] = k
        self.v[:, :, self.n:self.n + q] = v
        self.n += q
        return self.k[:, :, : self.n], self.v[:, :, : self.n]

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.n], self.v[:, :, : self.n]

    def nbytes(self) -> int:  # the allocated capacity: what the cache really holds
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def index_batch(self, fn) -> None:
        if self.k is not None:
            self.k, self.v = fn(self.k), fn(self.v)


def step_positions(cache, seen: int, q: int, batch: int, device) -> torch.Tensor:
    """[B, q] int32 cache positions of a step's tokens, -1 where the token is left padding."""
    pos = torch.arange(seen, seen + q, device=device, dtype=torch.int32)
    if cache.all_real_from(seen):
        return pos.expand(batch, q)
    return torch.where(cache.real_tokens(seen, q, batch, device), pos, -1)


def grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """query [B, Hk*G, q, D] over keys/values [B, Hk, n, D] with visible [B, 1 or Hk, q, n] (True = attend).
    The G query heads of KV head h (heads h*G .. h*G+G-1) are folded onto it: the cache is read once, never
    repeated. Returns [B, q, Hk*G, D] (the layout transformers' attention functions return)."""
    b, hq, q, d = query.shape
    hk = keys.shape[1]
    g = hq // hk
    qf = query.reshape(b, hk, g * q, d)
    mask = visible[:, :, None].expand(b, visible.shape[1], g, q, visible.shape[-1]).reshape(b, visible.shape[1], g * q, -1)
    mask = mask | ~mask.any(-1, keepdim=True)  # a query that sees nothing (padding) attends uniformly, not NaN
    out = F.scaled_dot_product_attention(qf, keys, values.to(qf.dtype), attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, q, d).transpose(1, 2)


class OwnLayer(DynamicLayer):
    """Base of the layers that attend themselves: the bookkeeping transformers asks of every cache layer."""

    is_croppable = False

    def __init__(self, cache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.seen = 0
        self.cumulative_length = 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if isinstance(query_length, torch.Tensor):  # older transformers passed cache_position
            query_length = query_length.shape[0]
        # every position seen: the layers keep every slot (quest, duo's retrieval heads) or mask from their own
        # positions (duo's streaming heads, adakv)
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise AccelError("an hf_accel KV cache cannot be cropped (evicted or summarised tokens cannot be restored)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


class BufferedLayer(OwnLayer):
    """An OwnLayer whose full-length K/V lives in a GrowBuffer (all heads for quest, the retrieval heads for duo),
    next to per-row tensors (batch first) named by `row_state`. Those follow the buffer through reset, beam
    reordering and batch expansion, and count in `nbytes`, so a subclass only declares them."""

    row_state: tuple[str, ...] = ()

    def __init__(self, cache, layer_idx: int, align: int = 128):
        super().__init__(cache, layer_idx)
        self.align = align
        self.buf = GrowBuffer(align)
        for name in self.row_state:
            setattr(self, name, None)

    def stored(self) -> int:
        return self.buf.n

    def _row_tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, name) for name in self.row_state) if t is not None]

    def nbytes(self) -> int:
        return self.buf.nbytes() + sum(t.nbytes for t in self._row_tensors())

    def reset(self) -> None:
        super().reset()
        self.seen, self.buf = 0, GrowBuffer(self.align)
        for name in self.row_state:
            setattr(self, name, None)

    def _per_row(self, fn) -> None:
        self.buf.index_batch(fn)
        for name in self.row_state:
            setattr(self, name, fn(getattr(self, name)))
        self.keys, self.values = self.buf.view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._per_row(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._per_row(lambda t: t.repeat_interleave(repeats, dim=0))
