"""`kvquant`: int8 / int4 / int2 KV cache, KIVI-style (Liu et al. 2024, arXiv:2402.02750), combinable with any eviction
plugin.

Keys: divided by a per-channel scale taken from the prompt (the fixed outlier channels KIVI quantizes per channel
for), then quantized per token in groups of `group` channels; values: quantized per token in groups of `group`
channels; the `residual` most recent tokens stay in full precision. Asymmetric codes with a scale and minimum per
group; int4 / int2 codes are packed two / four per byte. Every token owns its scales, so an eviction policy can drop
any token without re-quantizing its neighbours (the full-precision window is never evicted).

With the `fast` runtime (`kvquant+fast`), the same quantization runs inside the runtime's captured decode steps:
apply() installs `_fast.QuantLayerFactory` as the model's `_hf_accel_kv_layer`, whose static-capacity layers hold
the codes for the whole capacity plus a small full-precision ring, and the cache this plugin's generate wrapper
builds tells the runtime it may serve the call (`KVCache.runtime_servable`). Combined with an eviction policy, the
runtime cannot serve it and transformers' loop runs, as before. `kernel` picks how those layers' decode attention
reads the cache: 'auto' = on CUDA a Triton kernel reads the codes in place (`hf_accel.kernels.kvquant_attention`;
a dequantised copy would cost more bandwidth than a bf16 cache), elsewhere the codes are dequantised; 'torch' =
always dequantise; 'triton' = the kernel's op everywhere (on the CPU its torch reference, or the kernel under
TRITON_INTERPRET=1). It changes nothing in transformers' loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hf_accel.errors import OptionError
from hf_accel.runtime.cache import KV_LAYER_ATTR

from ._fast import QuantLayerFactory
from ._generate import QUANT_ATTR, KVPlugin


@dataclass
class KVQuant(KVPlugin):
    """int8 / int4 / int2 KV cache (per-channel-scaled keys, per-token values, full-precision recent window)."""

    name = "kvquant"
    attr = QUANT_ATTR
    bits: Literal[8, 4, 2] = 4
    group: int = 32  # channels sharing one scale and minimum
    residual: int = 128  # most recent tokens kept in full precision
    kernel: Literal["auto", "torch", "triton"] = "auto"  # kvquant+fast decode attention: see the module docstring

    def __post_init__(self):
        if self.group < 2 or self.group % 2 or self.residual < 0:
            raise OptionError(f"plugin 'kvquant': 'group' must be an even number >= 2 and 'residual' >= 0 "
                              f"(got group={self.group}, residual={self.residual})")
        if self.bits == 2 and self.group % 4:
            raise OptionError(f"plugin 'kvquant': bits=2 packs four channels per byte, so 'group' must be a multiple "
                              f"of 4 (got group={self.group})")

    def check(self, model):
        super().check(model)
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head_dim % self.group:
            raise OptionError(f"plugin 'kvquant': group={self.group} must divide the head dimension ({head_dim}); "
                              f"try group={math.gcd(head_dim, self.group)}")

    def apply(self, model, patcher):
        super().apply(model, patcher)
        patcher.set_attr(model, KV_LAYER_ATTR, QuantLayerFactory(self.bits, self.group, self.residual, model, self.kernel))

    def card_metadata(self, model):
        return {"kv_bits": self.bits, "kv_group": self.group, "kv_residual": self.residual}
