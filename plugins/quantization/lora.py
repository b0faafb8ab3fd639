"""LoRA / QLoRA on hf_accel's quantized linears (int8, int4, fp8) through peft's custom-module hook.

peft dispatches LoRA by layer type and knows only its own quantized backends, so `lora_config(...)` registers
`QuantLoraLinear` for our layers (peft's documented, experimental `LoraConfig._register_custom_module`). The packed
base weight stays frozen and untouched; the adapter trains in the activations' dtype. peft does not save the custom
mapping with the adapter, so load adapters with `load_adapter`.

Merging is explicit: `merge()` on a quantized layer refuses (re-quantizing base + delta would round most of the
adapter away), and `merge_dequantized(model)` returns float layers with the adapters merged into the dequantised
weights.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from hf_accel.errors import AccelError

from .fp8 import Fp8Linear
from .int4 import Int4Linear
from .int8 import Int8Linear

QUANTIZED_LINEARS = (Int8Linear, Int4Linear, Fp8Linear)


class QuantLoraLinear(nn.Module, LoraLayer):
    """y = base(x) + B(A(dropout(x))) * scaling, with `base` one of hf_accel's quantized linears."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs):
        if config.lora_bias or config.use_dora:
            raise AccelError("LoRA on hf_accel quantized layers supports plain LoRA only (no lora_bias, no DoRA)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            h = lora_B(lora_A(self.lora_dropout[adapter](x.to(lora_A.weight.dtype))))
            result = result + (h * self.scaling[adapter]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise AccelError(
            f"cannot merge a LoRA adapter into {type(self.base_layer).__name__}: re-quantizing base + delta would round "
            "most of the adapter away. Keep the adapter separate, or use "
            "hf_accel.plugins.quantization.lora.merge_dequantized(model) to get float layers with it merged."
        )

    def unmerge(self) -> None:
        return None  # nothing is ever merged into the packed weight

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config(**kwargs: Any) -> LoraConfig:
    """A peft LoraConfig that knows hf_accel's quantized linears."""
    return register(LoraConfig(**kwargs))


def register(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({cls: QuantLoraLinear for cls in QUANTIZED_LINEARS})
    return config


def load_adapter(model: nn.Module, adapter_path: str, **kwargs: Any) -> PeftModel:
    """PeftModel.from_pretrained for a model with hf_accel quantized layers (re-registers the custom mapping)."""
    config = PeftConfig.from_pretrained(adapter_path)
    return PeftModel.from_pretrained(model, adapter_path, config=register(config), **kwargs)


@torch.no_grad()
def merge_dequantized(model: nn.Module) -> nn.Module:
    """Replace every QuantLoraLinear by an nn.Linear holding dequantised base weight + merged active adapters.

    The result is a float model (no longer an hf_accel artifact for those layers): it trades the memory savings
    for an exact merge."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLoraLinear)]
    for name, layer in targets:
        base = layer.get_base_layer()
        weight = base.dequantize().float()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).float()
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           dtype=base.weight_scale.dtype, device=weight.device)
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model
