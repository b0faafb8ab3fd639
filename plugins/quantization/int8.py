"""Weight-only int8 quantization: per-output-channel symmetric scales (LLM.int8's weight format without outliers;
the "W8A16" baseline of torchao's Int8WeightOnlyConfig).

The forward is the op `hf_accel::int8_linear` (hf_accel.kernels.w8): a Triton GEMV that streams the int8 weight
once per token on CUDA (batch 1; tensor-core kernel up to 64 rows; dequantise + cuBLAS for prefill), plain torch
elsewhere. One opaque op, so torch.compile and CUDA graphs capture it.

`method="gptq"` / `"awq"` calibrate on the reference corpus (methods.py, calibrate.py); `outliers=f` keeps a
fraction f of each row exactly in a sparse side matrix (sparse.py), so one large weight no longer sets its row's
scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hf_accel.kernels import int8_linear

from .calibrate import CalibratedWeightPlugin
from .linear import linear_parts
from .methods import Grid, Quantized, outlier_count
from .sparse import add_outliers, init_outliers, outlier_repr, sparse_matrix


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

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 outliers_per_row: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        init_outliers(self, outliers_per_row, dtype, device)

    @classmethod
    def from_quantized(cls, linear: nn.Module, result: Quantized) -> "Int8Linear":
        """From a methods.py result (codes in [-127, 127], per-row scale, optional outliers)."""
        k = 0 if result.outlier_index is None else result.outlier_index.shape[1]
        module = cls.skeleton_of(linear, k)
        _, _, _, bias = linear_parts(linear)
        module.weight.data.copy_(result.codes[:, : module.in_features].to(torch.int8))
        module.weight_scale.data.copy_(result.scale[:, 0])
        if k:
            module.weight_outlier_index.data.copy_(result.outlier_index)
            module.weight_outlier_value.data.copy_(result.outlier_value)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

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
    def skeleton_of(cls, linear: nn.Module, outliers_per_row: int = 0) -> "Int8Linear":
        """An empty module on the linear's device (meta while transformers builds the model) for saved weights."""
        in_f, out_f, weight, bias = linear_parts(linear)
        return cls(in_f, out_f, bias is not None, weight.dtype, weight.device, outliers_per_row)

    def dequantize(self) -> torch.Tensor:
        w = self.weight.to(self.weight_scale.dtype) * self.weight_scale[:, None]
        if self.outliers_per_row:
            w = w + sparse_matrix(self.weight_outlier_index, self.weight_outlier_value, self.in_features, w.dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU: F.linear(x, q) * scale + b (scale after the matmul); CUDA: the fused Triton kernels.
        y = int8_linear(x, self.weight, self.weight_scale, self.bias)
        if self.outliers_per_row:
            y = add_outliers(y, x, self.weight_outlier_index, self.weight_outlier_value)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 per-channel{outlier_repr(self)}")


@dataclass
class Int8WeightOnly(CalibratedWeightPlugin):
    """Weight-only int8 with per-output-channel symmetric scales; halves weight memory of bf16 linears."""

    name = "int8"

    method: Literal["rtn", "awq", "gptq"] = "rtn"

    def uses_default_path(self) -> bool:
        return self.method == "rtn" and not self.outliers

    def grid(self, dtype: torch.dtype) -> Grid:
        return Grid(8, 0, "symmetric", dtype)

    def from_result(self, linear, result: Quantized):
        return Int8Linear.from_quantized(linear, result)

    def quantize(self, linear):
        return Int8Linear.from_linear(linear)

    def skeleton(self, linear):
        return Int8Linear.skeleton_of(linear, outlier_count(self.outliers, linear_parts(linear)[0]))

    def card_metadata(self, model):
        mods = [m for m in model.modules() if isinstance(m, Int8Linear)]
        meta = {"int8_weights": sum(m.weight.numel() for m in mods)}
        if self.method != "rtn":
            meta["int8_method"] = self.method
        if self.outliers:
            meta["int8_outlier_fraction"] = self.outliers
        return meta
