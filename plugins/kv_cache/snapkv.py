"""`snapkv`: prompt compression from an observation window (SnapKV, Li et al. 2024, arXiv:2404.14469).

At prefill (and at every later prefill of a multi-turn conversation), the last `window` prompt queries vote for
prompt positions, per KV head; the votes are pooled over neighbouring positions (`kernel`) so that kept tokens come
in clusters, and the top `budget - window` positions plus the window are kept. Decoding then appends without
eviction, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hf_accel.errors import OptionError

from ._generate import EvictionPolicy, attention_scores, pool_votes, recent


@dataclass
class SnapKVPolicy(EvictionPolicy):
    """Prefill compression by observation-window attention with pooling, per KV head (SnapKV)."""

    name = "snapkv"
    needs_attention = True
    fast_servable = True  # `snapkv+fast` / `sink+fast`: static layers in the fast runtime (_fast_evict.py)
    budget: int = 1024  # prompt tokens kept per KV head (including the window)
    window: int = 32  # observation window: the last prompt queries, always kept
    kernel: int = 7  # pooling width over positions (odd)
    pooling: Literal["max", "avg"] = "max"

    def __post_init__(self):
        self._positive(budget=self.budget, window=self.window, kernel=self.kernel)
        if self.kernel % 2 == 0 or self.window >= self.budget:
            raise OptionError(f"plugin 'snapkv': 'kernel' must be odd and 'window' < 'budget' "
                              f"(got kernel={self.kernel}, window={self.window}, budget={self.budget})")

    def wants_scores(self, layer, q_len):
        return q_len > 1 and layer.stored() > self.budget + self.slack

    def evicts_now(self, layer, q_len):
        return q_len > 1

    def observe(self, layer, query, keys, scaling):
        votes = attention_scores(layer, query, keys, scaling, self.window)  # [B, H, n]
        layer.scratch = pool_votes(votes, layer.pos >= 0, self.kernel, self.pooling)

    def score(self, layer, pos):
        return layer.scratch[..., : pos.shape[-1]]

    def protected(self, layer, pos):
        return recent(layer, pos, self.window)
