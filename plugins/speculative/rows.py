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

Tree drafts (Medusa) use the same slots: the q nodes of a tree go to `start[b] .. start[b]+q-1` in node order, each
node sees the row's cached slots before `start[b]` plus its own ancestors, and its position is the row's position at
`start[b]` plus its depth. After verification `RowCache.move` copies the K/V of each row's accepted path to contiguous
slots; the other nodes lie beyond the committed length and roll back like rejected chain drafts.
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

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy each row's K/V at slots `src` [B, m] to slots `dst` [B, m] (all reads happen before the writes)."""
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            for buf in (layer.keys, layer.values):
                b, h, _, d = buf.shape
                m = src.shape[1]
                moved = buf.gather(2, src[:, None, :, None].expand(b, h, m, d))
                buf.scatter_(2, dst[:, None, :, None].expand(b, h, m, d), moved)


def num_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def row_forward(model, cache: RowCache, tokens: torch.Tensor, start: torch.Tensor, real: torch.Tensor,
                n_pads: torch.Tensor, kv_len: int, last_only: bool = False, *, tree=None, hidden: bool = False):
    """Run `tokens` [B, q] at slots start[b] + j; return float32 logits [B, q, V] (or [B, 1, V] with `last_only`).

    `real` [B, capacity] is False at left-pad slots; `n_pads` [B] counts them (logical position = slot - n_pads).
    `kv_len` = max(start) + q, given by the caller, who knows it without a device sync. Query j of row b sees the
    row's real slots up to its own, plus itself (so a pad query is never fully masked).
    `tree` (an object with `visible` [q, q] bool and `depth` [q]): the tokens are the nodes of a draft tree instead
    of a chain; node j sees the cached slots before start[b] and its ancestors, at position start[b] + depth[j].
    `hidden=True` also returns the decoder's last hidden state [B, q, H] (what Medusa heads read): (logits, hidden).
    """
    b, q = tokens.shape
    dev = tokens.device
    slots = start[:, None] + torch.arange(q, device=dev)  # [B, q]
    cache.slots, cache.kv_len = slots, kv_len
    keys = torch.arange(kv_len, device=dev)
    if tree is None:
        visible = (real[:, None, :kv_len] & (keys <= slots[:, :, None])) | (keys == slots[:, :, None])  # [B, q, K]
        positions = (slots - n_pads[:, None]).clamp_min(0)
    else:
        rel = keys - start[:, None]  # [B, K]: key slot relative to the row's first node
        past = real[:, :kv_len] & (rel < 0)
        ancestor = tree.visible[:, rel.clamp(0, q - 1)].permute(1, 0, 2)  # [B, q, K]
        visible = past[:, None] | (ancestor & ((rel >= 0) & (rel < q))[:, None])
        positions = (start - n_pads).clamp_min(0)[:, None] + tree.depth[None]
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:  # a quantized embedding table: use the dtype the layers compute in
        dtype = model.dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=dev)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    kwargs = {"logits_to_keep": 1} if last_only else {}
    captured = []
    hook = model.get_decoder().register_forward_hook(lambda m, a, out: captured.append(_last_hidden(out))) \
        if hidden else None
    try:
        out = model(input_ids=tokens, attention_mask=mask[:, None], position_ids=positions,
                    **{cache_kwarg(model): cache}, use_cache=True, **kwargs)
    finally:
        if hook is not None:
            hook.remove()
    if hidden:
        return out.logits.float(), captured[-1]
    return out.logits.float()
