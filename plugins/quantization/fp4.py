"""Weight-only FP4 (e2m1) with block scales: MXFP4 (block 32, E8M0 scales) or NVFP4 (block 16, e4m3 scales and
one fp32 tensor scale), dequantised inside the Triton kernel (`hf_accel.kernels.fp4`).

    AutoModelForCausalLM.from_pretrained(model_id, accel="fp4")                  # MXFP4
    AutoModelForCausalLM.from_pretrained(model_id, accel="fp4(format=nvfp4)")

State-dict names: `weight` (e2m1 codes packed 8 per int32, [out, in_padded / 8]), `weight_scale` (uint8 block
scales: E8M0 exponents or e4m3 bits, [out, blocks]), `weight_global_scale` (fp32 [1]; 1 for MXFP4), `bias`.

Speed, honestly: Hopper has no FP4 tensor cores, so this is a storage format. Decode at batch 1 streams ~4.25
(MXFP4) or ~4.5 (NVFP4) bits per weight, about the bytes of int4 g32/g64, and decodes e2m1 on the CUDA cores;
prefill dequantises to bf16 and runs cuBLAS (no FLOP gain). Quality: RTN e2m1 has 8 magnitudes against int4's 16
levels, so expect more error than int4 at the same bytes. The point is the format (Blackwell checkpoints, OCP MX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hf_accel.kernels.fp4 import FORMATS, fp4_dequantize, fp4_linear, quantize_fp4
from hf_accel.kernels.int4 import padded_k

from .linear import WeightOnlyLinearPlugin, linear_parts


class Fp4Linear(nn.Module):
    """y = x @ W.T + b with W in MXFP4 / NVFP4 block-scale storage (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, fmt: str, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.compute_dtype = in_features, out_features, fmt, dtype
        block = FORMATS[fmt]
        kp = padded_k(in_features, block)
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.empty(out_features, kp // 8, dtype=torch.int32, device=device), **frozen)
        self.weight_scale = nn.Parameter(torch.empty(out_features, kp // block, dtype=torch.uint8, device=device), **frozen)
        self.weight_global_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device), **frozen)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), **frozen) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str) -> "Fp4Linear":
        module = cls.skeleton_of(linear, fmt)
        _, _, weight, bias = linear_parts(linear)
        q, s, g = quantize_fp4(weight, fmt)
        module.weight.data.copy_(q)
        module.weight_scale.data.copy_(s)
        module.weight_global_scale.data.copy_(g)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def skeleton_of(cls, linear: nn.Module, fmt: str) -> "Fp4Linear":
        in_f, out_f, weight, bias = linear_parts(linear)
        return cls(in_f, out_f, bias is not None, weight.dtype, fmt, weight.device)

    def dequantize(self) -> torch.Tensor:
        return fp4_dequantize(self.weight, self.weight_scale, self.weight_global_scale, self.fmt, self.in_features,
                              self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp4_linear(x, self.weight, self.weight_scale, self.weight_global_scale, self.bias,
                          self.fmt == "nvfp4", self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.fmt}"


@dataclass
class Fp4WeightOnly(WeightOnlyLinearPlugin):
    """Weight-only FP4 block-scale storage (MXFP4 or NVFP4), decoded in the kernel; ~3.7x smaller linears."""

    name = "fp4"

    format: Literal["mxfp4", "nvfp4"] = "mxfp4"

    def quantize(self, linear):
        return Fp4Linear.from_linear(linear, self.format)

    def skeleton(self, linear):
        return Fp4Linear.skeleton_of(linear, self.format)

    def card_metadata(self, model):
        mods = [m for m in model.modules() if isinstance(m, Fp4Linear)]
        n = sum(m.out_features * m.in_features for m in mods)
        stored = sum(m.weight.numel() * 4 + m.weight_scale.numel() + 4 for m in mods)
        return {"fp4_weights": n, "fp4_format": self.format, "fp4_bits_per_weight": round(8 * stored / max(n, 1), 3)}
