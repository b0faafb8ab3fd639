"""Weight-only fp8 (e4m3) with a per-output-channel scale: half the bytes of bf16 linears, activations untouched.

w = q * scale with q a float8_e4m3fn ([out, in], the `weight`) and scale = max|w_row| / 448 in the model's dtype
(`weight_scale`, [out]). The forward is the op `hf_accel::fp8_linear` (hf_accel.kernels.w8): on CUDA a Triton GEMV
that streams the fp8 bytes once per token (any GPU: the kernel decodes e4m3 itself, so no fp8 tensor cores are
needed), a tensor-core kernel for small batches and dequantise + cuBLAS for prefill; plain torch elsewhere.
Compared with int8 per-channel: the same bytes, a relative (floating) grid that keeps small weights precise and
is coarser on large ones.

`fp8(activations=dynamic)`: the same weights, and for batches of at least `min_tokens` rows (prefill, large
batches) the activations are quantized per token to e4m3 and multiplied on the fp8 tensor cores by
`torch._scaled_mm` (W8A8, hf_accel.kernels.fp8_act); smaller batches (decode) keep the weight-only kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hf_accel.errors import OptionError
from hf_accel.kernels import fp8_linear, fp8_w8a8_linear
from hf_accel.kernels.w8 import FP8_MAX, w8_dequantize

from .linear import WeightOnlyLinearPlugin, linear_parts


@torch.no_grad()
def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], scale [N] in `dtype`); the codes use the stored (rounded) scale."""
    dtype = dtype or weight.dtype
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    q = (w / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Fp8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + b with q float8_e4m3fn (out, in) and scale (out,)."""

    TP_DIMS = {"weight": (0, 1), "weight_scale": (0, None), "bias": (0, None)}  # see Int8Linear
    _hf_quantized_needs_local_tp = True

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device), **frozen)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), **frozen)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), **frozen) if bias else None
        self.act_min_tokens = 0  # > 0: W8A8 (dynamic per-token activation scales) from this many rows on

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Fp8Linear":
        module = cls.skeleton_of(linear)
        _, _, weight, bias = linear_parts(linear)
        q, scale = quantize_fp8(weight)
        module.weight.data.copy_(q)
        module.weight_scale.data.copy_(scale)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def skeleton_of(cls, linear: nn.Module) -> "Fp8Linear":
        in_f, out_f, weight, bias = linear_parts(linear)
        return cls(in_f, out_f, bias is not None, weight.dtype, weight.device)

    def dequantize(self) -> torch.Tensor:
        return w8_dequantize(self.weight, self.weight_scale, self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_min_tokens:
            return fp8_w8a8_linear(x, self.weight, self.weight_scale, self.bias, self.act_min_tokens)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8 e4m3 per-channel"


@dataclass
class Fp8WeightOnly(WeightOnlyLinearPlugin):
    """Weight-only fp8 (e4m3) with per-output-channel scales; halves weight memory of bf16 linears."""

    name = "fp8"

    activations: Literal["none", "dynamic"] = "none"  # "dynamic": W8A8 with per-token scales for >= min_tokens rows
    min_tokens: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.min_tokens < 1:
            raise OptionError(f"plugin 'fp8': option 'min_tokens' must be >= 1, got {self.min_tokens}")

    def _mode(self, module: Fp8Linear) -> Fp8Linear:
        module.act_min_tokens = self.min_tokens if self.activations == "dynamic" else 0
        return module

    def quantize(self, linear):
        return self._mode(Fp8Linear.from_linear(linear))

    def skeleton(self, linear):
        return self._mode(Fp8Linear.skeleton_of(linear))

    def card_metadata(self, model):
        n = sum(m.weight.numel() for m in model.modules() if isinstance(m, Fp8Linear))
        meta = {"fp8_weights": n}
        if self.activations == "dynamic":
            meta["fp8_activations"] = f"dynamic per-token e4m3 from {self.min_tokens} rows"
        return meta
