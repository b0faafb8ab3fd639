"""`snapkv+fast`, `sink+fast`, `h2o+fast`, `adakv+fast`: eviction inside the fast runtime, in layers as small as
what they keep.

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

h2o: eviction during decode, inside the captured step (`H2OStaticLayer`). A layer holds at most budget + slack + 1
tokens per row and KV head, in `kv_capacity` = ALIGN-rounded min(kept + new, budget + slack + 1) slots, each with
`pos` (the sequence slot of its token, -1 padding, EMPTY free; int32) and `acc` (its accumulated attention, float32):
4 + 4 bytes per slot next to 2 x head_dim x 2 bytes of bf16 K/V (1.6% at head_dim 128). Storage order is free (the
attention is order-blind), so nothing is ever compacted:
- prefill (eager): `KVLayer`'s own rule at the end of the prompt: `H2OPolicy.observe` scores the last
  `prefill_window` queries (the attention hook hands them over, as for snapkv), and above budget + slack the top
  `budget` by score, recent window protected, padding first (`keep_indices`, shared with snapkv and sink) are kept
  in slots [0, kept) with their scores; the rest is EMPTY.
- decode step (capturable; one token, `per_row_slots = False`): `update` writes the token into each (row, head)'s
  first EMPTY slot (a scatter at `next_slot()`, an argmin over slot ids) with score 0 and returns a view;
  `fast_sdpa` calls its `attend(query)`: the weights of the query over the slots, softmax'd under a mask of each
  head's own live slots (`pos` >= 0: a head's padding and free slots, so no cross-head agreement is needed), are
  materialised ([B, Hkv, G, C] float32, small), give the output (weights @ V) and, summed over the G query heads of
  the KV head, are added to `acc` -- the same numbers `attention_scores` adds in transformers' loop, from the same
  logits. Then `evict`: after a step that leaves budget + slack + 1 tokens stored (V(n) above, from the sequence
  slot: no counter), the `slack + 1` lowest scores per row and head (recent window +inf, padding -inf, EMPTY +inf;
  equal scores: the later position goes, `_layers.rank_key`, as KVLayer keeps the earlier)
  become EMPTY (topk of fixed k, then a scatter of `where(full, EMPTY, pos)`: computed every step, applied only
  then). The next steps' tokens fill those slots. This is `KVLayer.evict` (topk of the `budget` best, the rest
  dropped) as a set, so h2o+fast keeps exactly h2o's tokens with h2o's scores (tests/test_kv_h2o_fast.py checks
  positions and scores per layer, row and head after every step, and greedy tokens on the tiny reference model);
  only the float summation order of the attention differs (slots in another order, SDPA vs matmul on the CPU).
  Rows evict independently (per-row topk); the step's cost beyond attention is one topk over C slots per head.
The runtime's shared mask (`visible`) is head 0's live slots; `attend` does not read it. h2o needs the runtime's SDPA
(`mask_kind` "fast": `fast_sdpa` hands `attend` the query); with other attention the factory refuses the call.

adakv: head-wise budgets (`AdaKVStaticLayer`). Heads keep different numbers of tokens (per row too), known only
after the prefill, while the runtime sizes the layers before it. A padded per-head layout would have to take the
worst case, min(T, H x budget - (H - 1) x ceil(floor x budget)) slots per head (6.6x the budget at H = 8, floor
0.2), or at best the widest head's count (`widest_head`, recorded at each prefill; 1.8x the budget on the tiny test
models). Instead every KV head's kept tokens of a row share one flat pool: the storage the runtime sizes as
[B, H, C, D] with C = min(T, budget) + new (aligned), viewed as [B, 1, H x C, D], each slot tagged with its KV head
(`head`) and sequence slot (`pos`), int32 each. The prefill runs adakv's own `AdaKVLayer._compress` (votes,
allocation) on the prompt (the attention hook hands over its queries) and packs each row's kept slots head after
head into [0, budget x H); new token i of KV head j goes to slot budget x H + i x H + j (laid out at the prefill,
so decode is one `index_copy_`). So the K/V bytes are exactly snapkv's at the same budget (H x (budget + new) slots
per row), plus 8 bytes per slot of tags. The price is in the decode attention (`attend`, through `fast_sdpa` like
h2o's): every query head's logits are taken over the whole pool and masked to its KV head's slots (head tag, pos
<= the step's slot), so K/V are read once but q.K and p.V cost H x the FLOPs, with a float32 logits tensor
[B, Hq, H x C] (a quarter of the K/V bytes at head_dim 128, G = 4, which the softmax passes over a few times).
Decode appends to every head, as adakv. Tokens equal adakv alone (tests/test_kv_adakv_fast.py); a Triton kernel
that reads each head's segment only is left to do.

Everything the decode step does is fixed-shape device arithmetic (capturable, compiled with the step); the prefill
runs eagerly and may sync. kvquant with an eviction policy has no layer here: those calls run transformers' loop
(`Unsupported`).
"""

from __future__ import annotations

import math
import weakref

import torch

from hf_accel.runtime import RuntimeLayer, Unsupported
from hf_accel.runtime.attention import mask_kind

from ._layers import PENDING, _gather, rank_key, top_slots

ALIGN = 64  # storage slots are rounded up to this (fewer buckets; masked slots cost bandwidth)
SELF_ATTENDING = ("h2o", "adakv")  # their decode `update` returns a view whose `attend` fast_sdpa calls


def kept_tokens(policy, prompt_len: int) -> int:
    """Prompt tokens a policy keeps of a (padded) prompt: `KVLayer` evicts only above budget + slack."""
    return policy.budget if prompt_len > policy.budget + policy.slack else prompt_len


def stored_tokens(n: torch.Tensor, kept: torch.Tensor, budget: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """Tokens `KVLayer` holds while the n-th new token's step attends (V(n) in the module docstring): it evicts back
    to `budget` after any step that leaves more than budget + slack stored."""
    n0 = budget + slack + 1 - kept
    return torch.where(n <= n0, kept + n, budget + 1 + torch.remainder(n - n0 - 1, slack + 1))


def keep_indices(policy, stand, pos: torch.Tensor, keep: int) -> torch.Tensor:
    """`KVLayer.evict` (no kvquant): the `keep` best slots of each row and KV head by the policy's own score (equal
    scores: the earlier position, `rank_key`), its protected slots first and padding last, returned in position
    order (padding first)."""
    score = policy.score(stand, pos).float()
    score = torch.where(policy.protected(stand, pos), math.inf, score)
    score = torch.where(pos < 0, -math.inf, score)  # padding goes first
    top = top_slots(score, pos, keep)  # ties to the earlier position, as KVLayer.evict
    return top.gather(-1, pos.gather(-1, top).argsort(dim=-1, stable=True))


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
                book.meta.copy_(torch.tensor([t, kept, p.budget, p.slack, self.policy_number()]))
                j = torch.arange(self.capacity, device=k.device)
                book.slot_pos.copy_(torch.where(j >= kept, t + j - kept, -1).expand_as(book.slot_pos))
                book.first.zero_()
            book.first[rows] = first.long()
        if kept == t and not self.policy.accumulates:  # short prompt: KVLayer keeps everything (padding included)
            self._store(rows, k, v, pos.long())
            return
        self.pending = (k, v, pos, first)
        if self.policy.needs_attention:  # snapkv, h2o: the attention hook calls `observe` with the prompt's queries
            PENDING.set(self)
        else:
            self.observe(None, k, None)

    def policy_number(self) -> int:
        """The fifth number of `book.meta`: sink's sinks."""
        return getattr(self.policy, "sinks", 0)

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
        idx = keep_indices(self.policy, stand, pos, self.policy.budget)
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
            seen = stored_tokens(q - t + 1, kept, budget, slack)  # the query is the (q - t + 1)-th new token
            first = self.book.first[:, None, None]
            vis = vis & ((seq < first + sinks) | (seq >= q + 1 - seen + sinks))
        return vis


EMPTY = -2  # h2o: `pos` of a storage slot that holds no token (never written, or freed by an eviction)


class OwnAttention:
    """What an h2o or adakv layer's decode `update` returns as both keys and values: `fast_sdpa` calls `attend`, the
    layer's own attention (h2o's also accumulates the step's weights and evicts; contract point 2)."""

    def __init__(self, layer: "H2OStaticLayer"):
        self.layer = layer

    def attend(self, query: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        return self.layer.attend(query, scale)

    def materialize(self):
        raise Unsupported(f"{self.layer.policy.name} under 'fast' attends inside its own layer; this attention call "
                          "(dropout, softcapping or a 2-D mask) cannot be served by it", whole_model=False)


class H2OStaticLayer(EvictStaticLayer):
    """h2o's fixed-capacity layer: at most budget + slack + 1 slots per row and KV head, each with its token's
    sequence slot (`pos`: -1 padding, EMPTY free) and accumulated attention (`acc`). See "h2o" in the module doc."""

    per_row_slots = False  # one token per step and row: h2o evicts after every step, so drafts cannot be rewound

    def __init__(self, layer_idx, keys, values, book, policy, pos: torch.Tensor, acc: torch.Tensor):
        super().__init__(layer_idx, keys, values, book, policy)
        self.pos, self.acc = pos, acc  # [B, H, C] int32, float32
        self.evicted = min(policy.slack + 1, self.capacity)  # tokens one eviction frees (KVLayer: stored - budget)

    def dynamic_dims(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        kv = (0, 2) if self.keys.shape[0] > 1 else (2,)
        return [(t, kv) for t in (self.keys, self.values, self.pos, self.acc)]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.pos.nbytes + self.acc.nbytes

    def policy_number(self) -> int:
        return self.policy.n_recent

    # -- prefill (eager): what KVLayer keeps at the end of the prompt, with its accumulated scores -------------------
    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.prefill_rows.start == 0:  # a new prompt: every row empty (rows that only fill the bucket stay so)
            self.pos.fill_(EMPTY)
            self.acc.zero_()
        super()._prefill(k, v)

    def observe(self, query, keys, scaling) -> None:
        """The prompt's queries [r, Hq, T, D] and keys: H2OPolicy.observe's scores, KVLayer's selection."""
        PENDING.set(None)
        k, v, pos, first = self.pending
        self.pending = None
        r, h, t, _ = k.shape
        pos = pos[:, None, :].expand(r, h, t).contiguous()
        stand = _Stand(pos, t, first)
        stand.acc = torch.zeros(r, h, t, dtype=torch.float32, device=k.device)
        self.policy.observe(stand, query, keys, scaling)
        if kept_tokens(self.policy, t) < t:
            idx = keep_indices(self.policy, stand, pos, self.policy.budget)
        else:
            idx = torch.arange(t, device=k.device).expand(r, h, t)
        n, rows = idx.shape[-1], self.prefill_rows
        self.keys[rows, :, :n].copy_(_gather(k, idx))
        self.values[rows, :, :n].copy_(_gather(v, idx))
        self.pos[rows, :, :n] = pos.gather(-1, idx)
        self.acc[rows, :, :n] = stand.acc.gather(-1, idx)
        self.written = True

    # -- decode (capturable) -------------------------------------------------------------------------------------------
    def next_slot(self) -> torch.Tensor:
        """[B, H]: the storage slot the next token goes to, the first free one (one always is, see the docstring)."""
        c = self.pos.shape[-1]
        j = torch.arange(c, device=self.pos.device, dtype=torch.int32)
        return torch.where(self.pos == EMPTY, j, c).amin(-1).clamp(max=c - 1).long()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefill_rows is not None:
            self._prefill(key_states, value_states)
            return key_states, value_states
        if self.pending is not None:
            raise Unsupported(f"h2o: layer {self.layer_idx} never received the prompt's queries (the model's "
                              "attention bypasses hf_accel's attention hook)", whole_model=False)
        b, h, q, d = key_states.shape
        if q != 1 or self.slots.dim() != 1:
            raise Unsupported("h2o under 'fast' decodes one token per step (it evicts after every step's attention, "
                              f"so drafts cannot be rewound); got {q} tokens", whole_model=False)
        free = self.next_slot()[:, :, None]  # [B, H, 1]
        self.keys.scatter_(2, free[..., None].expand(b, h, 1, d), key_states)
        self.values.scatter_(2, free[..., None].expand(b, h, 1, d), value_states)
        self.pos.scatter_(2, free, self.slots.to(self.pos.dtype).expand(b, h, 1))
        self.acc.scatter_(2, free, 0.0)
        view = OwnAttention(self)
        return view, view

    def attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """[B, 1, Hq, D]: attention of the step's query over the live slots of each row and KV head (a mask of
        its own, from `pos`); the weights, summed over the query heads of each KV head, are added to `acc` as
        `H2OPolicy.observe` adds them, then `evict`."""
        b, hq, _, d = query.shape
        hk = self.keys.shape[1]
        logits = torch.matmul(query.reshape(b, hk, hq // hk, d), self.keys.transpose(-1, -2)).float() * scale
        probs = logits.masked_fill((self.pos < 0)[:, :, None, :], -math.inf).softmax(-1)  # the new token is live
        out = torch.matmul(probs.to(self.values.dtype), self.values)  # [B, Hk, G, D]
        self.acc.add_(probs.sum(2))
        self.evict()
        return out.reshape(b, hq, 1, d).transpose(1, 2)

    def evict(self) -> None:
        """After a step that leaves budget + slack + 1 tokens stored, free the `slack + 1` lowest-scoring slots per
        row and KV head: `KVLayer.evict`'s rule (H2OPolicy.score = acc, its recent window protected, padding
        first) on the device; every other step computes the same and writes the positions back unchanged."""
        t, kept, budget, slack, n_recent = self.book.meta.unbind()
        s = self.slots  # [1]: this step's token is the (s - t + 1)-th new one; KVLayer's `seen` is s + 1
        full = stored_tokens(s - t + 1, kept, budget, slack) == budget + slack + 1
        pos = self.pos
        score = self.acc.masked_fill(pos >= s + 1 - n_recent, math.inf)  # H2OPolicy.protected (recent)
        score = score.masked_fill(pos == -1, -math.inf).masked_fill(pos == EMPTY, math.inf)
        # the lowest by KVLayer's order (ties: the later position goes), so the survivors are its top `budget`
        victims = rank_key(score, pos).topk(self.evicted, dim=-1, largest=False).indices
        pos.scatter_(2, victims, torch.where(full, EMPTY, pos.gather(2, victims)))

    def visible(self, slots: torch.Tensor) -> torch.Tensor:
        """The runtime's mask: KV head 0's live slots after this step's write. `attend` masks each head by its own
        `pos` and does not read it."""
        c = self.pos.shape[-1]
        live = (self.pos[:, 0] >= 0) | (torch.arange(c, device=self.pos.device) == self.next_slot()[:, :1])
        return live[:, None, :].expand(live.shape[0], slots.shape[-1], c)


class AdaKVStaticLayer(EvictStaticLayer):
    """adakv's layer for the fast runtime: every KV head's kept tokens of a row share one flat pool of H x C slots
    (the storage the runtime sizes as [B, H, C, D], viewed [B, 1, H*C, D]), each slot tagged with its KV head
    (`head`) and sequence slot (`pos`, -1 nothing). See "adakv" in the module docstring."""

    per_row_slots = False  # one token per step (the new tokens' slots are laid out per step at the prefill)

    def __init__(self, layer_idx, keys, values, book, policy, head: torch.Tensor, pos: torch.Tensor):
        super().__init__(layer_idx, keys, values, book, policy)
        b, h, c, d = keys.shape
        self.flat_keys, self.flat_values = keys.view(b, 1, h * c, d), values.view(b, 1, h * c, d)
        self.head_grid, self.pos_grid = head, pos  # [B, H, C] int32 (what the runtime marks dynamic)
        self.head, self.pos = head.view(b, h * c), pos.view(b, h * c)
        self.widest_head = 0  # most slots one (row, KV head) kept at the last prefill: a padded layout's width

    def dynamic_dims(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        batched = self.keys.shape[0] > 1
        grid, flat = ((0, 2), (0, 1)) if batched else ((2,), (1,))
        return ([(t, grid) for t in (self.keys, self.values, self.head_grid, self.pos_grid)]
                + [(t, grid) for t in (self.flat_keys, self.flat_values)] + [(t, flat) for t in (self.head, self.pos)])

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.head.nbytes + self.pos.nbytes

    # -- prefill (eager): adakv's own selection (AdaKVLayer._compress on the prompt), packed head after head ----------
    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        rows, (r, h, t, d) = self.prefill_rows, k.shape
        if h != self.keys.shape[1] or d != self.keys.shape[3]:
            raise Unsupported(f"keys of shape {tuple(k.shape)} do not fit a cache of {self.keys.shape[1]} heads x "
                              f"{self.keys.shape[3]} dims")
        width = min(t, self.policy.budget) * h  # flat slots of the kept prompt (AdaKVLayer keeps budget x H at most)
        if width + h > self.head.shape[1]:
            raise Unsupported(f"adakv: {width} kept slots do not fit {self.head.shape[1]}", whole_model=False)
        if rows.start == 0:  # a new prompt: new token i of KV head j goes to flat slot width + i * H + j
            self._lay_out_new_tokens(t, width, h)
            if self.layer_idx == 0:
                self.book.meta.copy_(torch.tensor([t, width, self.policy.budget, 0, 0]))
        valid = self.prefill_valid
        valid = torch.ones(r, t, dtype=torch.bool, device=k.device) if valid is None else valid.to(k.device).bool()
        pos = torch.where(valid, torch.arange(t, device=k.device, dtype=torch.int32), -1)
        self.written = False
        self.pending = (k, v, pos)
        if t > self.policy.budget:  # AdaKVLayer compresses a prompt longer than the budget, with its queries
            PENDING.set(self)
        else:
            self._store([k[:, i:i + 1] for i in range(h)], [v[:, i:i + 1] for i in range(h)], [pos] * h)

    def _lay_out_new_tokens(self, t: int, width: int, h: int) -> None:
        self.widest_head = 0
        self.head.fill_(-1)
        self.pos.fill_(-1)
        n = self.head.shape[1] - width
        j = torch.arange(n, device=self.head.device, dtype=torch.int32)
        self.head[:, width:] = j % h
        self.pos[:, width:] = t + torch.div(j, h, rounding_mode="floor")

    def observe(self, query, keys, scaling) -> None:
        """The prompt's queries: AdaKVLayer's votes and allocation, run on an AdaKVLayer holding the prompt."""
        from .adakv import AdaKVLayer

        PENDING.set(None)
        k, v, pos = self.pending
        t, h = k.shape[2], k.shape[1]
        stand = AdaKVLayer(None, self.layer_idx, self.policy)
        stand.hk, stand.hv = [k[:, i:i + 1] for i in range(h)], [v[:, i:i + 1] for i in range(h)]
        stand.hpos = [pos] * h
        stand.q_pos, stand.seen = torch.arange(t, device=k.device), t
        stand._compress(query, scaling)
        self._store(stand.hk, stand.hv, stand.hpos)

    def _store(self, hk: list, hv: list, hpos: list) -> None:
        """Per KV head i: K/V [r, 1, n_i, D] and positions [r, n_i] (-1 empty) -> the rows' flat pools, each row's
        kept slots first (head after head), its empty ones dropped."""
        self.pending = None
        rows = self.prefill_rows
        keys, values = torch.cat(hk, dim=2)[:, 0], torch.cat(hv, dim=2)[:, 0]  # [r, sum n_i, D]
        pos = torch.cat(hpos, dim=1)
        head = torch.cat([torch.full_like(p, i) for i, p in enumerate(hpos)], dim=1)
        kept = pos >= 0
        self.widest_head = max(self.widest_head, max(int(p.ge(0).sum(1).max()) for p in hpos))
        n = min(int(kept.sum(1).max()), int(self.book.meta[1]))
        order = (~kept).to(torch.int8).argsort(dim=1, stable=True)[:, :n]  # kept first, in head order
        keep = kept.gather(1, order)
        self.flat_keys[rows, 0, :n] = _gather(keys[:, None], order[:, None])[:, 0]
        self.flat_values[rows, 0, :n] = _gather(values[:, None], order[:, None])[:, 0]
        self.pos[rows, :n] = torch.where(keep, pos.gather(1, order), -1)
        self.head[rows, :n] = torch.where(keep, head.gather(1, order), -1)
        self.written = True

    # -- decode (capturable) -----------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefill_rows is not None:
            self._prefill(key_states, value_states)
            return key_states, value_states
        if self.pending is not None:
            raise Unsupported(f"adakv: layer {self.layer_idx} never received the prompt's queries (the model's "
                              "attention bypasses hf_accel's attention hook)", whole_model=False)
        b, h, q, d = key_states.shape
        if q != 1 or self.slots.dim() != 1:
            raise Unsupported(f"adakv under 'fast' decodes one token per step; got {q} tokens", whole_model=False)
        t, width = self.book.meta[0:1], self.book.meta[1:2]
        flat = width + (self.slots - t) * h + torch.arange(h, device=key_states.device)
        flat = flat.clamp(max=self.head.shape[1] - 1)  # steps past the end (the host reads `done` late) stay inside
        self.flat_keys.index_copy_(2, flat, key_states.transpose(1, 2))
        self.flat_values.index_copy_(2, flat, value_states.transpose(1, 2))
        view = OwnAttention(self)
        return view, view

    def attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """[B, 1, Hq, D]: each query head over the pool's slots of its KV head up to this step (a mask of its own)."""
        b, hq, _, d = query.shape
        groups = hq // self.keys.shape[1]
        logits = torch.matmul(query.reshape(b, 1, hq, d), self.flat_keys.transpose(-1, -2)).float() * scale
        kv_head = torch.arange(hq, device=query.device, dtype=torch.int32) // groups  # [Hq]
        mine = (self.head[:, None, :] == kv_head[None, :, None]) & (self.pos[:, None, :] >= 0)
        mine = mine & (self.pos[:, None, :] <= self.slots)  # [B, Hq, N]
        probs = logits.masked_fill(~mine[:, None], -math.inf).softmax(-1)
        return torch.matmul(probs.to(self.flat_values.dtype), self.flat_values)  # [B, 1, Hq, D]

    def visible(self, slots: torch.Tensor) -> torch.Tensor:
        """The runtime's mask (its [B, Q, C] shape): all visible; `attend` masks each query head itself."""
        b, c = self.keys.shape[0], self.keys.shape[2]
        return torch.ones(b, slots.shape[-1], c, dtype=torch.bool, device=self.keys.device)


class EvictLayerFactory:
    """The `_hf_accel_kv_layer` factory snapkv, sink, h2o and adakv install. Its layers are views into one flat K and V
    storage per decoder layer that grows only when a larger bucket needs it (as `KVPool`); `release()` frees it."""

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
        if policy.name in SELF_ATTENDING and mask_kind(model) != "fast":
            raise Unsupported(f"{policy.name} under 'fast' attends inside its own layer, which only the runtime's "
                              "SDPA (`fast_sdpa`) hands over; load the model with attn_implementation='sdpa' "
                              f"(this one uses {model.config._attn_implementation!r})", whole_model=False)
        return policy

    def kv_capacity(self, prompt_len: int, new_tokens: int) -> int:
        """Storage slots for a prompt of `prompt_len` (padded) tokens and `new_tokens`: kept + new, aligned (h2o:
        at most budget + slack + 1, what it holds at most)."""
        try:
            policy = self.policy()
        except Unsupported:
            return prompt_len + new_tokens  # the call will be refused by __call__
        if policy.name == "adakv":  # a flat pool of budget x H kept + H per new token = H x (kept + new) slots
            return ALIGN * math.ceil((min(prompt_len, policy.budget) + new_tokens) / ALIGN)
        slots = kept_tokens(policy, prompt_len) + new_tokens
        if policy.name == "h2o":
            slots = min(slots, policy.budget + policy.slack + 1)
        return ALIGN * math.ceil(slots / ALIGN)

    def __call__(self, layer_idx: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        policy = self.policy()
        shape = (batch, kv_heads, capacity, head_dim)
        key = (batch, capacity, str(device))
        if key not in self.books:
            self.books[key] = Book(batch, capacity, device)
        keys, values = (self._view(layer_idx, name, shape, dtype, device) for name in ("k", "v"))
        if policy.name == "h2o":
            pos = self._view(layer_idx, "pos", shape[:3], torch.int32, device)
            acc = self._view(layer_idx, "acc", shape[:3], torch.float32, device)
            return H2OStaticLayer(layer_idx, keys, values, self.books[key], policy, pos, acc)
        if policy.name == "adakv":
            head = self._view(layer_idx, "head", shape[:3], torch.int32, device)
            pos = self._view(layer_idx, "pos", shape[:3], torch.int32, device)
            return AdaKVStaticLayer(layer_idx, keys, values, self.books[key], policy, head, pos)
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
        """K/V bytes this factory holds (every layer, the largest bucket since the last release; h2o: with its
        per-slot positions and scores)."""
        return sum(t.nbytes for t in self.storage.values())
