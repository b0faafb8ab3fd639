"""Weight-only int8 quantization: per-output-channel symmetric scales (LLM.int8's weight format without outliers;
the "W8A16" baseline of torchao's Int8WeightOnlyConfig).

The forward is the op `hf_accel::int8_linear` (hf_accel.kernels.w8): a Triton GEMV that streams the int8 weight
once per token on CUDA (batch 1; tensor-core kernel up to 64 rows; dequantise + cuBLAS for prefill), plain torch
elsewhere. One opaque op, so torch.compile and CUDA graphs capture it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hf_accel.kernels import int8_linear

from .linear import WeightOnlyLinearPlugin, linear_parts


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ≈ q * scale, q in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale + b, with q int8 (out, in) and scale float (out,).

    `weight` keeps its name so state-dict keys, tied-weight logic and PEFT lookups of `.weight` still find it."""

    # tensor parallelism (hf_accel.distributed): {tensor: (split dim column-wise, row-wise or None = replicated)}
    TP_DIMS = {"weight": (0, 1), "weight_scale": (0, None), "bias": (0, None)}
    _hf_quantized_needs_local_tp = True  # transformers' TP runs our forward on the local shards

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        module = cls.skeleton_of(linear)
        _, _, weight, bias = linear_parts(linear)
        q, scale = quantize_per_channel(weight)
        module.weight.data.copy_(q)
        module.weight_scale.data.copy_(scale.to(weight.dtype))
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def skeleton_of(cls, linear: nn.Module) -> "Int8Linear":
        """An empty module on the linear's device (meta while transformers builds the model) for saved weights."""
        in_f, out_f, weight, bias = linear_parts(linear)
        return cls(in_f, out_f, bias is not None, weight.dtype, weight.device)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.weight_scale.dtype) * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU: F.linear(x, q) * scale + b (scale after the matmul); CUDA: the fused Triton kernels.
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 per-channel"


@dataclass
class Int8WeightOnly(WeightOnlyLinearPlugin):
    """Weight-only int8 with per-output-channel symmetric scales; halves weight memory of bf16 linears."""

    name = "int8"

    def quantize(self, linear):
        return Int8Linear.from_linear(linear)

    def skeleton(self, linear):
        return Int8Linear.skeleton_of(linear)

    def card_metadata(self, model):
        n = sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))
        return {"int8_weights": n}
