"""`snapkv+fast`, `sink+fast`: prompt eviction inside the fast runtime, with layers as small as what they keep.

The runtime (hf_accel/runtime/__init__.py, contract point 2) asks this factory for one layer per decoder layer and
bucket. `kv_capacity(T, new)` sizes them: the prompt tokens the policy keeps plus the new tokens, rounded up to
`ALIGN` slots, not the sequence's capacity, so the memory and every decode step's reads scale with the budget.

Slots and positions. The runtime keeps counting in sequence slots (ids index s: the prompt is [0, T), the n-th new
token is T + n - 1) and position ids per row, as for the full cache. A layer stores

    storage slots  [0, kept)           the kept prompt tokens, compacted, in position order (padding first)
                   [kept, capacity)    new tokens: sequence slot s lives at storage slot s - T + kept

where kept is the same for every row, layer and KV head (each head keeps its own top-k but the same number of
tokens). RoPE is applied before the cache, so the compacted keys stay correct and later tokens keep their original
positions. `update` maps the runtime's sequence slots ([Q] shared, or [B, Q] per row for speculative sessions) to
storage slots on the device; `visible(slots)` gives the runtime the decode mask over storage slots. That mask comes
from `book.slot_pos` [B, C], the sequence slot each storage slot holds (-1: padding or nothing), fixed at the
prefill: a query at sequence slot q sees storage slot j iff 0 <= slot_pos[j] <= q (so rejected drafts, later slots,
stay hidden), and, for sink, only the sinks and the most recent tokens as `KVLayer` would have kept them (below).
One mask serves every layer (transformers builds one), which holds because kept padding is the same in every head
and layer: padding is evicted first, so a row keeps max(0, kept - real tokens) of it, sorted first.

What is kept is exactly what `KVLayer` (the policies in transformers' loop) keeps: the same scores, top-k and
order, computed by the policies' own `observe` / `score` / `protected` on a stand-in for the layer (`_Stand`):
- snapkv: at a prompt longer than budget + slack, the last `window` queries vote (the attention hook hands this
  layer the prompt's queries, like `KVLayer`'s `observe`); decode appends, nothing is evicted.
- sink: the first `sinks` real tokens of each row and the most recent ones. `KVLayer` evicts back to `budget`
  whenever more than budget + slack are stored, after the step attended; so the n-th new token sees V(n) tokens,

      V(n) = S0 + n                                  while S0 + n <= budget + slack + 1 (n0 = that last n)
           = budget + 1 + (n - n0 - 1) mod (slack + 1)  afterwards,

  S0 = kept. Those are a row's sinks and its V(n) - sinks most recent tokens (every real token when it has fewer),
  and they lie in storage already (new tokens are all stored), so eviction during decode is a mask, computed from
  the sequence slot on the device: no host sync, and `rewind` needs nothing from the layer. Storage is kept + new
  tokens (what the step reads), not budget + slack: bounded memory for endless generation is transformers' loop's.

Everything the decode step does is fixed-shape device arithmetic (capturable, compiled with the step); the prefill
runs eagerly and may sync. kvquant with an eviction policy, h2o (eviction by each decode step's attention) and
adakv (per-head budgets) have no layer here: those calls run transformers' loop (`Unsupported`).
"""

from __future__ import annotations

import math
import weakref

import torch

from hf_accel.runtime import RuntimeLayer, Unsupported

from ._layers import PENDING, _gather

ALIGN = 64  # storage slots are rounded up to this (fewer buckets; masked slots cost bandwidth)


def kept_tokens(policy, prompt_len: int) -> int:
    """Prompt tokens a policy keeps of a (padded) prompt: `KVLayer` evicts only above budget + slack."""
    return policy.budget if prompt_len > policy.budget + policy.slack else prompt_len


class _Stand:
    """What the policies' `observe` / `score` / `protected` read of a `KVLayer` (and of its cache)."""

    def __init__(self, pos: torch.Tensor, seen: int, first: torch.Tensor):
        self.pos, self.seen, self.first = pos, seen, first
        self.cache = self
        self.scratch = None

    def first_real(self, batch, device):
        return self.first


class Book:
    """Per-bucket device tensors that every layer reads: meta = (T, kept, budget, slack, sinks), slot_pos [B, C],
    first [B] (first real token of each row). Layer 0 writes them at the prefill; the others only read them. The
    policy's numbers are tensors too, so a compiled step does not guard on them (a new budget does not recompile)."""

    def __init__(self, batch: int, capacity: int, device):
        self.meta = torch.zeros(5, dtype=torch.long, device=device)
        self.slot_pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.first = torch.zeros(batch, dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return self.meta.nbytes + self.slot_pos.nbytes + self.first.nbytes


class EvictStaticLayer(RuntimeLayer):
    """One decoder layer's kept K/V for the fast runtime (`StaticKVLayer`'s interface, own storage slots)."""

    per_row_slots = True

    def __init__(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, book: Book, policy):
        super().__init__()
        self.layer_idx, self.keys, self.values, self.book, self.policy = layer_idx, keys, values, book, policy
        self.is_initialized = True
        self.capacity = keys.shape[2]
        self.sink = policy.name == "sink"
        self.prefill_rows: slice | None = None  # None: decode mode
        self.prefill_valid: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.written = False
        self.pending = None  # snapkv: the prompt chunk waiting for its queries (`observe`)

    def dynamic_dims(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        batched = self.keys.shape[0] > 1
        kv = (0, 2) if batched else (2,)
        dims = [(self.keys, kv), (self.values, kv), (self.book.slot_pos, (0, 1) if batched else (1,))]
        return dims + ([(self.book.first, (0,))] if batched else [])

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    # -- prefill (eager) ----------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefill_rows is not None:
            self._prefill(key_states, value_states)
            return key_states, value_states
        if self.pending is not None:
            raise Unsupported(f"{self.policy.name}: layer {self.layer_idx} never received the prompt's queries (the "
                              "model's attention bypasses hf_accel's attention hook)", whole_model=False)
        t, kept = self.book.meta[0:1], self.book.meta[1:2]
        # sequence slots -> storage slots (the bound from the tensor: a symbolic size, not a constant to guard on)
        storage = (self.slots - t + kept).clamp(0, self.keys.shape[2] - 1)
        if storage.dim() == 2:  # per-row slots [B, Q]
            index = storage[:, None, :, None]
            self.keys.scatter_(2, index.expand_as(key_states), key_states)
            self.values.scatter_(2, index.expand_as(value_states), value_states)
        else:
            self.keys.index_copy_(2, storage, key_states)
            self.values.index_copy_(2, storage, value_states)
        return self.keys, self.values

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        rows, book = self.prefill_rows, self.book
        r, h, t, _ = k.shape
        if h != self.keys.shape[1] or k.shape[3] != self.keys.shape[3]:
            raise Unsupported(f"keys of shape {tuple(k.shape)} do not fit a cache of {self.keys.shape[1]} heads x "
                              f"{self.keys.shape[3]} dims")
        kept = kept_tokens(self.policy, t)
        if kept >= self.capacity:
            raise Unsupported(f"{self.policy.name}: {kept} kept prompt tokens do not fit {self.capacity} slots",
                              whole_model=False)
        valid = self.prefill_valid
        valid = torch.ones(r, t, dtype=torch.bool, device=k.device) if valid is None else valid.to(k.device).bool()
        pos = torch.where(valid, torch.arange(t, device=k.device, dtype=torch.int32), -1)  # [r, T] as KVLayer's
        first = (~valid).sum(-1).to(torch.int32)
        self.written = False
        if self.layer_idx == 0:
            if rows.start == 0:  # a new prompt: generated tokens' slots, no kept tokens yet (rows filling the bucket)
                p = self.policy
                book.meta.copy_(torch.tensor([t, kept, p.budget, p.slack, getattr(p, "sinks", 0)]))
                j = torch.arange(self.capacity, device=k.device)
                book.slot_pos.copy_(torch.where(j >= kept, t + j - kept, -1).expand_as(book.slot_pos))
                book.first.zero_()
            book.first[rows] = first.long()
        if kept == t:  # short prompt: KVLayer keeps everything (padding included, masked)
            self._store(rows, k, v, pos.long())
            return
        self.pending = (k, v, pos, first)
        if self.policy.needs_attention:  # snapkv: the attention hook calls `observe` with the prompt's queries
            PENDING.set(self)
        else:
            self.observe(None, k, None)

    def observe(self, query, keys, scaling) -> None:
        """The prompt's queries [r, Hq, T, D] and the keys they attended to: choose what to keep, store it."""
        PENDING.set(None)
        k, v, pos, first = self.pending
        self.pending = None
        r, h, t, _ = k.shape
        pos = pos[:, None, :].expand(r, h, t).contiguous()
        stand = _Stand(pos, t, first)
        if query is not None:
            self.policy.observe(stand, query, keys, scaling)
        # KVLayer.evict, for n_fixed = 0
        score = self.policy.score(stand, pos).float()
        score = torch.where(self.policy.protected(stand, pos), math.inf, score)
        score = torch.where(pos < 0, -math.inf, score)  # padding goes first
        top = score.topk(self.policy.budget, dim=-1).indices
        idx = top.gather(-1, pos.gather(-1, top).argsort(dim=-1))  # back to position order: padding first
        self._store(self.prefill_rows, _gather(k, idx), _gather(v, idx), pos[:, 0].gather(-1, idx[:, 0]).long())

    def _store(self, rows: slice, k: torch.Tensor, v: torch.Tensor, slot_pos: torch.Tensor) -> None:
        n = k.shape[2]
        self.keys[rows, :, :n].copy_(k)
        self.values[rows, :, :n].copy_(v)
        if self.layer_idx == 0:  # head 0's positions: the padding (-1) is the same in every head, sink's tokens too
            self.book.slot_pos[rows, :n] = slot_pos
        self.written = True

    # -- decode: the mask over storage slots (capturable) ------------------------------------------------------------
    def visible(self, slots: torch.Tensor) -> torch.Tensor:
        """[B, Q, C] bool: storage slot j is visible to the query at sequence slot `slots[..., q]`."""
        seq = self.book.slot_pos[:, None, :]  # [B, 1, C]
        q = slots[..., None]  # [Q, 1] or [B, Q, 1]
        vis = (seq >= 0) & (seq <= q)
        if self.sink:
            t, kept, budget, slack, sinks = self.book.meta.unbind()
            n = q - t + 1  # the query is the n-th new token
            n0 = budget + slack + 1 - kept
            seen = torch.where(n <= n0, kept + n, budget + 1 + torch.remainder(n - n0 - 1, slack + 1))
            first = self.book.first[:, None, None]
            vis = vis & ((seq < first + sinks) | (seq >= q + 1 - seen + sinks))
        return vis


class EvictLayerFactory:
    """The `_hf_accel_kv_layer` factory snapkv and sink install. Its layers are views into one flat K and V storage
    per decoder layer that grows only when a larger bucket needs it (as `KVPool`); `release()` frees it."""

    def __init__(self, model):
        self.model = weakref.ref(model)  # asked for its policy at each call
        self.storage: dict[tuple[int, str], torch.Tensor] = {}
        self.books: dict[tuple, Book] = {}

    def __deepcopy__(self, memo):  # a deep-copied model gets a factory of its own, with no storage
        model = self.model()
        return EvictLayerFactory(memo.get(id(model), model))

    def policy(self):
        from ._generate import POLICY_ATTR, QUANT_ATTR

        model = self.model()
        policy = getattr(model, POLICY_ATTR, None) if model is not None else None
        if policy is None or not getattr(policy, "fast_servable", False):
            name = getattr(policy, "name", None)
            raise Unsupported(f"the KV policy {name!r} has no layer for the fast runtime", whole_model=False)
        if getattr(model, QUANT_ATTR, None) is not None:
            raise Unsupported(f"kvquant combined with the eviction policy {policy.name!r} has no layer for the fast "
                              "runtime", whole_model=False)
        return policy

    def kv_capacity(self, prompt_len: int, new_tokens: int) -> int:
        """Storage slots for a prompt of `prompt_len` (padded) tokens and `new_tokens`: kept + new, aligned."""
        try:
            kept = kept_tokens(self.policy(), prompt_len)
        except Unsupported:
            return prompt_len + new_tokens  # the call will be refused by __call__
        return ALIGN * math.ceil((kept + new_tokens) / ALIGN)

    def __call__(self, layer_idx: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        policy = self.policy()
        shape = (batch, kv_heads, capacity, head_dim)
        key = (batch, capacity, str(device))
        if key not in self.books:
            self.books[key] = Book(batch, capacity, device)
        keys, values = (self._view(layer_idx, name, shape, dtype, device) for name in ("k", "v"))
        return EvictStaticLayer(layer_idx, keys, values, self.books[key], policy)

    def _view(self, layer_idx: int, name: str, shape: tuple, dtype, device) -> torch.Tensor:
        need = math.prod(shape)
        flat = self.storage.get((layer_idx, name))
        if flat is None or flat.numel() < need or flat.dtype != dtype or flat.device != torch.device(device):
            self.storage.pop((layer_idx, name), None)  # free before taking the new storage
            flat = torch.zeros(need, dtype=dtype, device=device)  # zeros: unwritten slots must read as finite
            self.storage[(layer_idx, name)] = flat
        return flat[:need].view(shape)

    def release(self) -> None:
        self.storage, self.books = {}, {}

    def nbytes(self) -> int:
        """K/V bytes this factory holds (every layer, the largest bucket since the last release)."""
        return sum(t.nbytes for t in self.storage.values())
