"""KV-cache plugins: eviction policies (`sink`, `h2o`, `snapkv`), the head-wise split (`duo`), query-aware page
selection (`quest`) and KV quantization (`kvquant`), composable.

    model = AutoModelForCausalLM.from_pretrained(model_id, accel="h2o(budget_tokens=2048)+kvquant(bits=4)")
    model.generate(**inputs, max_new_tokens=512)                   # the policy's cache is built by generate()

A policy is one small dataclass with `score()` (and `protected()`); `_layers.py` holds the cache layer (eviction,
quantized storage, the padding rules) and `_generate.py` the generate wrapper and the attention hook.
"""

from ._generate import EvictionPolicy, KVPlugin
from ._layers import KVCache, KVLayer
from .duo import DuoPolicy, calibrate_duo
from .h2o import H2OPolicy
from .kvquant import KVQuant
from .quest import QuestPolicy
from .sink import SinkPolicy
from .snapkv import SnapKVPolicy

__all__ = ["DuoPolicy", "EvictionPolicy", "H2OPolicy", "KVCache", "KVLayer", "KVPlugin", "KVQuant", "QuestPolicy",
           "SinkPolicy", "SnapKVPolicy", "calibrate_duo"]
