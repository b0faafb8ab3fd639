"""`h2o`: heavy hitters + recent tokens (H2O, Zhang et al. 2023, arXiv:2306.14048).

Each slot accumulates the attention it receives; during decode the step's single query is scored against the keys
it just attended to (one q.K product per layer and step, taken in the attention hook: no eager attention, no full
attention matrix). The prefill contributes the attention of its last `prefill_window` queries (SnapKV's observation
window), which keeps a long prompt's scoring linear in its length. Per KV head (query heads of a group are summed),
evicting every step once the budget is full.

`h2o+fast` runs this rule inside the fast runtime's CUDA graph (`_fast_evict.H2OStaticLayer`): budget + slack + 1
static slots per row and KV head; each step writes the new token into a free slot, takes the weights of its query
over the kept slots from its own attention (materialised: [B, H, slots]), accumulates them like `observe`, and after
a full step frees the `slack + 1` lowest-scoring slots outside the recent window. Same tokens as h2o alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_accel.errors import OptionError

from ._generate import EvictionPolicy, attention_scores, recent


@dataclass
class H2OPolicy(EvictionPolicy):
    """Heavy hitters + recent window (H2O), evicting during decode by accumulated attention, per KV head."""

    name = "h2o"
    needs_attention = True
    accumulates = True
    fast_servable = True  # `h2o+fast`: a fixed-capacity layer that evicts inside the CUDA graph (_fast_evict.py)
    budget: int = 1024  # tokens kept per KV head
    recent: int | None = None  # recent tokens always kept (default: half the budget)
    prefill_window: int = 64  # prompt queries whose attention is accumulated at prefill

    def __post_init__(self):
        self._positive(budget=self.budget, prefill_window=self.prefill_window)
        if self.recent is not None and not 0 <= self.recent < self.budget:
            raise OptionError(f"plugin 'h2o': option 'recent' must be in [0, budget), got {self.recent}")

    @property
    def n_recent(self) -> int:
        return self.budget // 2 if self.recent is None else self.recent

    def observe(self, layer, query, keys, scaling):
        last = self.prefill_window if query.shape[-2] > 1 else 1
        layer.acc += attention_scores(layer, query, keys, scaling, last)

    def score(self, layer, pos):
        return layer.acc[..., : pos.shape[-1]]

    def protected(self, layer, pos):
        return recent(layer, pos, self.n_recent)
