"""`adakv`: head-wise adaptive budgets (Ada-KV, Feng et al. 2024, arXiv:2407.11550) that really free memory.

At every prefill (the prompt, and each later turn of a multi-turn conversation) whose heads hold more than `budget`
tokens, the last `window` queries vote for earlier tokens per KV head, as in SnapKV (softmax attention summed over
the window's queries and the query heads of the KV head, pooled over `kernel` neighbouring slots). The layer's
total budget, `budget` x num_kv_heads tokens per batch row, is then shared among its heads adaptively: every head
first keeps its top `ceil(floor * budget)` tokens (the safeguard), the rest of the layer's budget goes to the best
remaining scores over all heads of the layer together. The observation window is always kept. Decode appends every
new token to every head (nothing is evicted until the next prefill).

Storage is per KV head: head h of a layer holds K/V [B, 1, n_h, D] and positions [B, n_h] (int32, -1 = an empty
slot: left padding, or a row that keeps fewer tokens in this head than the batch's longest row). So a head that
keeps 10 tokens holds 10 slots, not a masked full-length tensor; with batch 1 the layer holds exactly
`budget * num_kv_heads` prompt slots. Attention (`attend`, called by hf_accel's attention hook) runs per KV head by
grouped SDPA over that head's slots with a mask built from their positions (causal, pad-aware, per row and head):
exact for what is kept.

`adakv+fast` (`_fast_evict.AdaKVStaticLayer`): the same selection at the prompt, stored for the fast runtime as one
flat pool per row of budget x heads kept slots (+ heads per new token), each tagged with its KV head; decode steps
attend over the pool with a per-head mask inside the CUDA graph. Same K/V bytes as this layout, same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hf_accel.errors import AccelError, OptionError

from ._generate import KV_PLUGINS, KVPlugin, pool_votes
from ._layers import SELF_ATTEND
from ._store import OwnLayer, grouped_attention, step_positions


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores per row; ties (max pooling makes plateaus) go to the earlier slot, so a
    left-padded row keeps what the same row alone keeps."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, :k]


def allocate(scores: list[torch.Tensor], budget: int, floor: int) -> list[torch.Tensor]:
    """Ada-KV allocation for one layer. scores: per KV head [B, n_h] (inf = must keep, -inf = never keep).
    Returns per head a bool keep mask [B, n_h]: per row, each head first keeps its top `floor` slots, then the best
    remaining slots over all heads fill the layer's `budget * heads` total. -inf slots are never kept."""
    b = scores[0].shape[0]
    sizes = [s.shape[1] for s in scores]
    flat = torch.cat(scores, dim=1)  # [B, sum n_h]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    start = 0
    for s, n in zip(scores, sizes):
        k = min(floor, n)
        if k:
            top = _top(s, k)
            keep[:, start:start + n].scatter_(1, top, True)
        start += n
    total = min(budget * len(scores), flat.shape[1])
    rest = total - int(keep.sum(1).min()) if b else 0
    if rest > 0:
        cand = flat.masked_fill(keep, -math.inf)
        top = _top(cand, min(rest, flat.shape[1]))
        # per row: only as many as that row still has room for
        room = (total - keep.sum(1, keepdim=True))  # [B, 1]
        take = torch.arange(top.shape[1], device=flat.device)[None] < room
        add = torch.zeros_like(keep)
        add.scatter_(1, top, take)
        keep |= add
    keep &= flat > -math.inf
    return list(keep.split(sizes, dim=1))


class AdaKVLayer(OwnLayer):
    def __init__(self, cache, layer_idx: int, policy: "AdaKVPolicy"):
        super().__init__(cache, layer_idx)
        self.policy = policy
        self.hk: list[torch.Tensor] = []  # per KV head [B, 1, n_h, D]
        self.hv: list[torch.Tensor] = []
        self.hpos: list[torch.Tensor] = []  # per KV head [B, n_h] int32, -1 = empty slot
        self.q_pos = None  # this step's absolute positions [q]
        self.compressions = 0

    def stored(self) -> int:
        return max((p.shape[1] for p in self.hpos), default=0)

    def head_lengths(self) -> torch.Tensor:
        """[B, H] real tokens kept per row and KV head."""
        return torch.stack([(p >= 0).sum(1) for p in self.hpos], dim=1)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, d = key_states.shape
        if self.hk and len(self.hk) != h:
            raise AccelError(f"adakv: layer {self.layer_idx} got {h} KV heads, its cache holds {len(self.hk)}")
        pos = step_positions(self.cache, self.seen, q, b, key_states.device)
        if not self.hk:
            self.hk = [key_states[:, i:i + 1].contiguous() for i in range(h)]
            self.hv = [value_states[:, i:i + 1].contiguous() for i in range(h)]
            self.hpos = [pos.contiguous() for _ in range(h)]
        else:
            self.hk = [torch.cat([t, key_states[:, i:i + 1]], 2) for i, t in enumerate(self.hk)]
            self.hv = [torch.cat([t, value_states[:, i:i + 1]], 2) for i, t in enumerate(self.hv)]
            self.hpos = [torch.cat([p, pos], 1) for p in self.hpos]
        self.q_pos = torch.arange(self.seen, self.seen + q, device=key_states.device)
        self.seen += q
        self.cumulative_length = self.seen
        self.keys, self.values = key_states, value_states  # transformers' view; attend() reads the heads
        SELF_ATTEND.set(self)
        return key_states, value_states

    def attend(self, module, query, key, value, attention_mask, scaling, base, *args, **kwargs):
        b, hq, q, d = query.shape
        h = len(self.hk)
        g = hq // h
        out = query.new_empty(b, q, hq, d)
        q_pos = self.q_pos
        for i in range(h):
            pos = self.hpos[i]
            n = pos.shape[1]
            visible = (pos[:, None, :] >= 0) & (pos[:, None, :] <= q_pos[None, :, None])  # [B, q, n]
            own = torch.arange(n - q, n, device=query.device)  # a query always sees its own key
            visible = visible | (torch.arange(n, device=query.device)[None, :] == own[:, None])[None]
            out[:, :, i * g:(i + 1) * g] = grouped_attention(query[:, i * g:(i + 1) * g], self.hk[i], self.hv[i],
                                                             visible[:, None], scaling).to(out.dtype)
        if q > 1 and self.stored() > self.policy.budget:
            self._compress(query, scaling)
        return out, None

    # -- compression -------------------------------------------------------------------------------------------------
    def _votes(self, i: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """SnapKV votes of head i: [B, n_i] (inf: observation window, -inf: empty slot)."""
        p = self.policy
        b, hq, q, d = query.shape
        g = hq // len(self.hk)
        last = min(p.window, q)
        pos = self.hpos[i]
        n = pos.shape[1]
        qo = query[:, i * g:(i + 1) * g, q - last:].float()  # [B, g, last, D]
        logits = torch.einsum("bgqd,bnd->bgqn", qo, self.hk[i][:, 0].float()) * scaling
        q_abs = self.q_pos[q - last:]
        visible = (pos[:, None, None, :] >= 0) & (pos[:, None, None, :] <= q_abs[None, None, :, None])
        probs = logits.masked_fill(~visible, -math.inf).softmax(-1).nan_to_num_(0.0)
        q_real = (pos[:, n - last:] >= 0).float()  # the step's own slots are the last q: padding queries do not vote
        votes = torch.einsum("bgqn,bq->bn", probs, q_real)
        # max: votes are >= 0, so padding slots (0) never win a neighbour's window; avg: the mean over the window's
        # real slots, as exact sums (padding does not dilute a row's first tokens, nor change its scores' bits)
        votes = pool_votes(votes, pos >= 0, p.kernel, p.pooling)
        votes = torch.where(pos >= self.seen - p.window, math.inf, votes)
        return torch.where(pos < 0, -math.inf, votes)

    def _compress(self, query: torch.Tensor, scaling: float) -> None:
        p = self.policy
        votes = [self._votes(i, query, scaling) for i in range(len(self.hk))]
        keep = allocate(votes, p.budget, math.ceil(p.floor * p.budget))
        hk, hv, hpos = [], [], []
        for i, m in enumerate(keep):
            width = max(int(m.sum(1).max()), 1)
            # kept slots first, in position order; rows keeping fewer end in empty slots (pos -1, zero K/V)
            order = torch.where(m, self.hpos[i].float(), math.inf).argsort(dim=1, stable=True)[:, :width]
            valid = m.gather(1, order)
            pos = torch.where(valid, self.hpos[i].gather(1, order), -1)
            idx = order[:, None, :, None].expand(-1, 1, -1, self.hk[i].shape[-1])
            k = self.hk[i].gather(2, idx) * valid[:, None, :, None]
            v = self.hv[i].gather(2, idx) * valid[:, None, :, None]
            hk.append(k.contiguous()), hv.append(v.contiguous()), hpos.append(pos.to(torch.int32).contiguous())
        self.hk, self.hv, self.hpos = hk, hv, hpos
        self.compressions += 1

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.hk, *self.hv, *self.hpos))

    def kv_nbytes(self) -> int:  # K and V only (positions excluded)
        return sum(t.nbytes for t in (*self.hk, *self.hv))

    def reset(self) -> None:
        super().reset()
        self.seen, self.hk, self.hv, self.hpos, self.q_pos = 0, [], [], [], None

    def _each(self, fn) -> None:
        self.hk, self.hv, self.hpos = [fn(t) for t in self.hk], [fn(t) for t in self.hv], [fn(t) for t in self.hpos]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._each(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._each(lambda t: t.repeat_interleave(repeats, dim=0))


@dataclass
class AdaKVPolicy(KVPlugin):
    """Ada-KV: SnapKV votes at prefill, the layer's budget shared among KV heads adaptively, per-head storage."""

    name = "adakv"
    needs_attention = True  # the layer attends over its per-head storage itself, through the attention hook
    fast_servable = True  # `adakv+fast`: one flat pool of every head's kept slots per row (_fast_evict.py)
    conflicts_with = KV_PLUGINS + ("adakv", "kvquant")
    budget: int = 1024  # mean prompt tokens kept per KV head (the layer keeps budget x num_kv_heads per row)
    window: int = 32  # observation window: the last prompt queries vote, and are always kept
    floor: float = 0.2  # share of the budget every head keeps at least (Ada-KV's safeguard)
    kernel: int = 7  # pooling width over slots (odd)
    pooling: Literal["max", "avg"] = "max"

    def __post_init__(self):
        for key in ("budget", "window", "kernel"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise OptionError(f"plugin 'adakv': option {key!r} must be an integer >= 1, got {value!r}")
        if self.kernel % 2 == 0 or self.window >= self.budget:
            raise OptionError(f"plugin 'adakv': 'kernel' must be odd and 'window' < 'budget' "
                              f"(got kernel={self.kernel}, window={self.window}, budget={self.budget})")
        if not 0.0 <= float(self.floor) <= 1.0:
            raise OptionError(f"plugin 'adakv': option 'floor' must be in [0, 1] (share of the budget each head "
                              f"keeps at least), got {self.floor}")
        if self.pooling not in ("max", "avg"):
            raise OptionError(f"plugin 'adakv': option 'pooling' must be 'max' or 'avg', got {self.pooling!r}")

    def make_layer(self, cache, layer_idx):
        return AdaKVLayer(cache, layer_idx, self)

    def apply(self, model, patcher):
        super().apply(model, patcher)
        from hf_accel.runtime.cache import KV_LAYER_ATTR

        from ._fast_evict import EvictLayerFactory

        patcher.set_attr(model, KV_LAYER_ATTR, EvictLayerFactory(model))

    def card_metadata(self, model):
        return {"kv_budget_tokens": self.budget, "kv_head_floor": self.floor}
