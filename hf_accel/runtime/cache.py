"""The static KV cache: one preallocated [batch, kv_heads, capacity, head_dim] buffer pair per layer.

A transformers attention module calls `past_key_values.update(k, v, layer_idx)`; our layers answer in two modes:

- prefill (eager, once per call): write the prompt's K/V into rows `rows`, slots [0, T), and return them as given,
  so the prompt attends only to itself (T x T, flash when unpadded);
- decode (captured): `index_copy_` the new K/V at the device-side slot indices `slots` and return the whole buffers
  (`slots` [Q] is shared by all rows; a speculative session's per-row slots [B, Q] are scattered row by row).
  The runtime's mask hides every slot that is not yet written, so nothing here depends on a host-side length.

All layers of all (batch, capacity) buckets are views into one `KVPool` per runtime, so a new bucket costs no memory
beyond the largest one; when the pool must grow, the runtime drops its captured graphs (they hold old addresses).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import as_kind, decode_mask


KV_LAYER_ATTR = "_hf_accel_kv_layer"  # a KV plugin's layer factory on the model (contract point 2 in __init__)


class Unsupported(Exception):
    """The runtime cannot run this call (or, with `whole_model`, this model at all) exactly; the caller falls back
    to transformers."""

    def __init__(self, message: str, whole_model: bool = True):
        super().__init__(message)
        self.whole_model = whole_model


class RuntimeLayer(CacheLayerMixin):
    """What every layer the runtime serves (its own, kvquant's, the eviction plugins') answers the same way to
    transformers: storage exists from the start, `capacity` slots, masks always given as 4-D tensors."""

    is_compileable = True
    is_sliding = False
    capacity: int

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        return None

    def get_seq_length(self, *args, **kwargs) -> int:  # only asked when position_ids are missing; we always pass them
        return 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:  # masks are always given as 4-D tensors
        return self.capacity, 0

    def get_max_length(self) -> int:
        return self.capacity


class StaticKVLayer(RuntimeLayer):
    """K/V buffers of one layer. `mode`, `rows` and `slots` are set by the runtime before each forward."""

    per_row_slots = True  # decode also takes slots [B, Q], one row each (a speculative session, `Runtime.start`)

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.capacity = keys.shape[2]
        self.prefill_rows: slice | None = None  # None: decode mode
        self.slots: torch.Tensor | None = None
        self.written = False  # set by prefill: proves the model routes its K/V through this cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefill_rows is not None:
            n = key_states.shape[2]
            if key_states.shape[1] != self.keys.shape[1] or key_states.shape[3] != self.keys.shape[3]:
                raise Unsupported(f"keys of shape {tuple(key_states.shape)} do not fit a cache of "
                                  f"{self.keys.shape[1]} heads x {self.keys.shape[3]} dims")
            self.keys[self.prefill_rows, :, :n].copy_(key_states)
            self.values[self.prefill_rows, :, :n].copy_(value_states)
            self.written = True
            return key_states, value_states
        if self.slots.dim() == 2:  # per-row slots [B, Q]
            index = self.slots[:, None, :, None]
            self.keys.scatter_(2, index.expand_as(key_states), key_states)
            self.values.scatter_(2, index.expand_as(value_states), value_states)
        else:
            self.keys.index_copy_(2, self.slots, key_states)
            self.values.index_copy_(2, self.slots, value_states)
        return self.keys, self.values


class KVCache(Cache):
    """A transformers `Cache` over runtime-owned layers (ours or a KV plugin's, see the contract in __init__)."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)

    def set_prefill(self, rows: slice | None, valid: torch.Tensor | None = None) -> None:
        """Prefill mode for `rows` (None: decode). `valid` [rows, T] (True = real prompt token, False = left
        padding) is handed to the layers as `prefill_valid`, for those that choose what to keep."""
        for layer in self.layers:
            layer.prefill_rows = rows
            layer.prefill_valid = valid

    def decode_mask(self, prompt_valid, prompt_len, slots, window, kind: str, dtype):
        """The decode step's 4-D mask [B, 1, Q, C]. Layers that store keys at slots of their own (an eviction
        policy's compacted prompt, contract point 2) say what each query sees (`visible(slots)` -> bool [B, Q, C]
        over their storage); otherwise slot = sequence position and `decode_mask` builds it from the prompt."""
        visible = getattr(self.layers[0], "visible", None)
        if visible is None:
            return decode_mask(prompt_valid, prompt_len, slots, window, kind, dtype)
        return as_kind(visible(slots)[:, None], "additive" if kind == "fast" else kind, dtype)

    def set_slots(self, slots: torch.Tensor) -> None:
        for layer in self.layers:
            layer.slots = slots


class KVPool:
    """Flat K and V storage per layer, reused by every (batch, capacity) bucket; grows only when it must."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.n_layers, self.kv_heads, self.head_dim, self.dtype, self.device = n_layers, kv_heads, head_dim, dtype, device
        self.tokens = 0  # batch x capacity the pool holds
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def ensure(self, batch: int, capacity: int, allocate: bool = True) -> bool:
        """Make room for [batch, capacity]; returns True when the storage moved (views taken before are stale).
        `allocate=False` (a KV plugin's layers hold the K/V): only the size is recorded."""
        need = batch * capacity
        if need <= self.tokens:
            return False
        self.k, self.v = [], []  # free the old storage before taking the new
        if not allocate:
            self.tokens = need
            return True
        n = need * self.kv_heads * self.head_dim
        # zeros, not empty: masked slots still enter the attention matmul with weight 0, and 0 * NaN is NaN
        self.k = [torch.zeros(n, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.v = [torch.zeros(n, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.tokens = need
        return True

    def layers(self, batch: int, capacity: int) -> list[StaticKVLayer]:
        n = batch * self.kv_heads * capacity * self.head_dim
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        return [StaticKVLayer(k[:n].view(shape), v[:n].view(shape)) for k, v in zip(self.k, self.v)]
