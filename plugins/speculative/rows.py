"""Per-row KV slots: the cache and the forward that let every row of a batch keep its own length.

transformers' `DynamicLayer.crop(-n)` cuts the same number of tokens from every row, so after a verification in
which row 0 accepted 4 drafts and row 1 accepted none, a shared cache would be wrong for one of them. Here the batch
keeps one slot layout: slot `s` of row `b` holds the `s`-th token of the row's left-padded sequence (prompt pads,
prompt, then generated tokens, contiguous). Each forward writes its `q` tokens at the row's own slots
`start[b] .. start[b]+q-1` (a scatter into a preallocated buffer) and returns the buffer up to the longest row, and
an explicit 4-D mask lets a query see only the row's real tokens at or before its own slot. Rolling a row back is
then free: its rejected drafts lie beyond its committed length, so no later query sees them, and the next forward of
that row overwrites them. Position ids are the row's logical positions (slot minus left pads), so RoPE is exactly what
the target alone would use.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from hf_accel.compat import cache_kwarg


class RowLayer(DynamicLayer):
    """One layer's K/V, [batch, kv_heads, capacity, head_dim], written at per-row slots (see `RowCache`)."""

    is_croppable = False

    def __init__(self, rows: "RowCache"):
        super().__init__()
        self.rows = rows

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, self.rows.capacity, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], self.rows.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.rows.slots  # [B, q]
        for buf, new in ((self.keys, key_states), (self.values, value_states)):
            b, h, q, d = new.shape
            buf.scatter_(2, slots[:, None, :, None].expand(b, h, q, d), new)
        return self.keys[:, :, : self.rows.kv_len], self.values[:, :, : self.rows.kv_len]

    def get_seq_length(self) -> int:
        return self.rows.kv_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.rows.kv_len, 0


class RowCache(Cache):
    """A cache whose rows have their own lengths. `row_forward` sets `slots` and `kv_len` before each forward."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.slots: torch.Tensor | None = None
        self.kv_len = 0
        super().__init__(layers=[RowLayer(self) for _ in range(num_layers)])


def num_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers


def row_forward(model, cache: RowCache, tokens: torch.Tensor, start: torch.Tensor, real: torch.Tensor,
                n_pads: torch.Tensor, kv_len: int, last_only: bool = False) -> torch.Tensor:
    """Run `tokens` [B, q] at slots start[b] + j; return float32 logits [B, q, V] (or [B, 1, V] with `last_only`).

    `real` [B, capacity] is False at left-pad slots; `n_pads` [B] counts them (logical position = slot - n_pads).
    `kv_len` = max(start) + q, given by the caller, who knows it without a device sync. Query j of row b sees the
    row's real slots up to its own, plus itself (so a pad query is never fully masked).
    """
    b, q = tokens.shape
    slots = start[:, None] + torch.arange(q, device=tokens.device)  # [B, q]
    cache.slots, cache.kv_len = slots, kv_len
    keys = torch.arange(kv_len, device=tokens.device)
    visible = (real[:, None, :kv_len] & (keys <= slots[:, :, None])) | (keys == slots[:, :, None])  # [B, q, K]
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:  # a quantized embedding table: use the dtype the layers compute in
        dtype = model.dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=tokens.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    positions = (slots - n_pads[:, None]).clamp_min(0)
    kwargs = {"logits_to_keep": 1} if last_only else {}
    out = model(input_ids=tokens, attention_mask=mask[:, None], position_ids=positions, **{cache_kwarg(model): cache},
                use_cache=True, **kwargs)
    return out.logits.float()
