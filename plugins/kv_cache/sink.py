"""`sink`: attention sinks + a recent window (StreamingLLM, Xiao et al. 2023, arXiv:2309.17453).

Keeps each row's first `sinks` real tokens and its `window` most recent ones: memory stays bounded however long
generation runs. Keys are stored already rotated (transformers applies RoPE before the cache), so, unlike the
paper, positions are not re-assigned inside the cache: the model keeps the true positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._generate import EvictionPolicy, first_real


@dataclass
class SinkPolicy(EvictionPolicy):
    """Attention sinks + recent window (StreamingLLM): bounded KV memory for endless generation."""

    name = "sink"
    fast_servable = True  # `snapkv+fast` / `sink+fast`: static layers in the fast runtime (_fast_evict.py)
    window: int = 1024  # most recent tokens kept
    sinks: int = 4  # first real tokens of each row, always kept

    def __post_init__(self):
        self._positive(window=self.window)
        if self.sinks < 0:
            self._positive(sinks=self.sinks)

    @property
    def budget(self) -> int:
        return self.sinks + self.window

    @property
    def min_kept(self) -> int:
        return self.sinks

    def score(self, layer, pos):
        return pos  # recency

    def protected(self, layer, pos):
        return first_real(layer, pos, self.sinks)
