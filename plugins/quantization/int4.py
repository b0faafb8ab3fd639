"""Weight-only int4, group-wise asymmetric (W4A16): ~3.5x smaller linears than bf16, and faster at batch 1 on CUDA.

Format (hf_accel.kernels.int4): per row and group of `group_size` consecutive inputs a scale s and a zero point z,
w = (q - z) * s with q in [0, 15]; q packed 8 per int32 in the layout the Triton GEMV reads with 16-byte loads
(see kernels/int4.py), s and z in the model's dtype. State-dict names: `weight` (packed int32 [out, in_padded / 8]),
`weight_scale` and `weight_zero` ([out, groups]), `bias`.

Quantizers (`method`):
- "rtn": min/max per group, z = -min / s (a float zero point, so both ends of the range are exact).
- "hqq": Half-Quadratic Quantization (Badri & Shaji, 2023): starting from min/max, the zero point is optimised
  with a few proximal steps on an l_p (p = 0.7) norm of the weight error, which ignores a few outliers to fit the
  bulk better; per group the best zero seen is kept. Scales stay the min/max ones.
- "awq", "gptq": calibrated on the reference corpus (methods.py, calibrate.py).
`zero_point="int"` / `"symmetric"` restrict z to integers in [0, 15] / to 8 (exactly compressed-tensors'
asymmetric / symmetric int4, see export.py); `outliers=f` keeps a fraction f of each row exactly in a sparse side
matrix (sparse.py: `weight_outlier_index`, `weight_outlier_value`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hf_accel.errors import OptionError
from hf_accel.kernels.int4 import GROUP_SIZES, int4_dequantize, int4_linear, pack_int4, padded_k

from .calibrate import CalibratedWeightPlugin
from .linear import linear_parts
from .methods import Grid, Quantized, outlier_count
from .sparse import add_outliers, init_outliers, outlier_repr, sparse_matrix

ROWS_PER_STEP = 2048  # quantize this many rows at a time (bounds the fp32 working memory)


def _minmax(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    s = ((hi - lo) / 15.0).clamp(min=1e-8)
    return s, -lo / s


def _stored(t: torch.Tensor, dtype: torch.dtype, positive: bool = False) -> torch.Tensor:
    """What the artifact will hold, back in fp32 (a scale never rounds to 0, also in fp16)."""
    if positive:
        t = t.clamp(min=torch.finfo(dtype).tiny)
    return t.to(dtype).float()


def _codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.round(wg / s[..., None] + z[..., None]).clamp(0, 15)


def _hqq_zero(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, iters: int = 20, p: float = 0.7,
              beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """HQQ's proximal zero-point update (scale fixed), keeping per group the zero with the lowest mean |error|."""
    best_z, best_err, last = z.clone(), None, float("inf")
    for _ in range(iters):
        q = _codes(wg, s, z)
        err = wg - (q - z[..., None]) * s[..., None]
        mean_err = err.abs().mean(dim=-1)
        if best_err is None:
            best_err = mean_err
        else:
            better = mean_err < best_err
            best_z = torch.where(better, z, best_z)
            best_err = torch.where(better, mean_err, best_err)
        total = float(mean_err.mean())  # HQQ's stopping rule: stop once the mean error no longer falls
        if total >= last:
            break
        last = total
        # shrink the error towards 0 under the l_p norm (generalised soft threshold), then refit the zero
        a = err.abs()
        shrunk = torch.sign(err) * torch.relu(a - a.clamp(min=1e-8).pow(p - 1) / beta)
        z = (q - (wg - shrunk) / s[..., None]).mean(dim=-1)
        beta *= kappa
    return best_z


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int = 128, method: str = "rtn", dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (packed int32 [N, Kp / 8], scales [N, G], zeros [N, G]) in `dtype` (default weight.dtype).

    Scales and zeros are rounded to `dtype` before the codes are chosen, so the codes are the best ones for the
    parameters the artifact actually stores."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    dtype = dtype or weight.dtype
    n, k = weight.shape
    kp = padded_k(k, group_size)
    # HQQ's iterations are elementwise passes: on a CPU-resident model, run them on the GPU when there is one
    work = torch.device("cuda") if method == "hqq" and weight.device.type == "cpu" and torch.cuda.is_available() else weight.device
    packed, scales, zeros = [], [], []
    for r0 in range(0, n, ROWS_PER_STEP):
        w = weight[r0:r0 + ROWS_PER_STEP].detach().to(work, torch.float32)
        if kp != k:
            w = torch.nn.functional.pad(w, (0, kp - k))
        wg = w.reshape(w.shape[0], kp // group_size, group_size)
        s, z = _minmax(wg)
        if method == "hqq":
            z = _hqq_zero(wg, s, z)
        elif method != "rtn":
            raise ValueError(f"method must be 'rtn' or 'hqq', got {method!r}")
        s, z = _stored(s, dtype, positive=True), _stored(z, dtype)
        q = _codes(wg, s, z).to(torch.uint8).reshape(w.shape[0], kp)
        packed.append(pack_int4(q, group_size).to(weight.device))
        scales.append(s.to(weight.device, dtype))
        zeros.append(z.to(weight.device, dtype))
    return torch.cat(packed), torch.cat(scales), torch.cat(zeros)


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W int4 group-wise (see the module docstring for the stored form).

    Under tensor parallelism every tensor splits along its output rows (column-wise) or along K by whole groups
    (row-wise: packed words, scales and zeros alike, since a group's words are contiguous), so a rank holds exactly
    the int4 layer of its slice of the float weight."""

    TP_DIMS = {"weight": (0, 1), "weight_scale": (0, 1), "weight_zero": (0, 1), "bias": (0, None)}
    _hf_quantized_needs_local_tp = True

    def tp_unit(self, kind: str) -> int:
        """Row-wise splits must keep whole groups (and no padding) on each rank."""
        return self.group_size if kind == "rowwise" else 1

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int,
                 device=None, outliers_per_row: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        kp = padded_k(in_features, group_size)
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.empty(out_features, kp // 8, dtype=torch.int32, device=device), **frozen)
        self.weight_scale = nn.Parameter(torch.empty(out_features, kp // group_size, dtype=dtype, device=device), **frozen)
        self.weight_zero = nn.Parameter(torch.empty(out_features, kp // group_size, dtype=dtype, device=device), **frozen)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), **frozen) if bias else None
        init_outliers(self, outliers_per_row, dtype, device)

    @classmethod
    def from_quantized(cls, linear: nn.Module, group_size: int, result: Quantized) -> "Int4Linear":
        """From a methods.py result (codes in [0, 15] over the padded K, scales/zeros, optional outliers)."""
        k = 0 if result.outlier_index is None else result.outlier_index.shape[1]
        module = cls.skeleton_of(linear, group_size, k)
        _, _, _, bias = linear_parts(linear)
        dev = module.weight.device
        module.weight.data.copy_(pack_int4(result.codes.to(torch.uint8), group_size).to(dev))
        module.weight_scale.data.copy_(result.scale)
        module.weight_zero.data.copy_(result.zero)
        if k:
            module.weight_outlier_index.data.copy_(result.outlier_index)
            module.weight_outlier_value.data.copy_(result.outlier_value)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int, method: str) -> "Int4Linear":
        module = cls.skeleton_of(linear, group_size)
        _, _, weight, bias = linear_parts(linear)
        q, s, z = quantize_int4(weight, group_size, method)
        module.weight.data.copy_(q)
        module.weight_scale.data.copy_(s)
        module.weight_zero.data.copy_(z)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def skeleton_of(cls, linear: nn.Module, group_size: int, outliers_per_row: int = 0) -> "Int4Linear":
        in_f, out_f, weight, bias = linear_parts(linear)
        return cls(in_f, out_f, bias is not None, weight.dtype, group_size, weight.device, outliers_per_row)

    def dequantize(self) -> torch.Tensor:
        w = int4_dequantize(self.weight, self.weight_scale, self.weight_zero, self.group_size, self.in_features,
                            self.weight_scale.dtype)
        if self.outliers_per_row:
            w = w + sparse_matrix(self.weight_outlier_index, self.weight_outlier_value, self.in_features, w.dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x.shape[-1], not in_features: under transformers' row-wise TP x and the packed words are this rank's slice
        y = int4_linear(x, self.weight, self.weight_scale, self.weight_zero, self.bias, self.group_size,
                        x.shape[-1])
        if self.outliers_per_row:
            y = add_outliers(y, x, self.weight_outlier_index, self.weight_outlier_value)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 group={self.group_size}{outlier_repr(self)}")


@dataclass
class Int4WeightOnly(CalibratedWeightPlugin):
    """Weight-only int4, group-wise (g32/64/128): RTN, data-free HQQ or calibrated AWQ/GPTQ, optional outliers."""

    name = "int4"

    group_size: int = 128
    method: Literal["rtn", "hqq", "awq", "gptq"] = "hqq"
    zero_point: Literal["float", "int", "symmetric"] = "float"

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in GROUP_SIZES:
            raise OptionError(f"plugin 'int4': option 'group_size' must be one of {list(GROUP_SIZES)}, got {self.group_size}")

    def uses_default_path(self) -> bool:
        return self.method in ("rtn", "hqq") and self.zero_point == "float" and not self.outliers

    def grid(self, dtype: torch.dtype) -> Grid:
        return Grid(4, self.group_size, self.zero_point, dtype)

    def from_result(self, linear, result: Quantized):
        return Int4Linear.from_quantized(linear, self.group_size, result)

    def quantize(self, linear):
        return Int4Linear.from_linear(linear, self.group_size, self.method)

    def skeleton(self, linear):
        in_f = linear_parts(linear)[0]
        return Int4Linear.skeleton_of(linear, self.group_size, outlier_count(self.outliers, in_f))

    def card_metadata(self, model):
        mods = [m for m in model.modules() if isinstance(m, Int4Linear)]
        n = sum(m.out_features * m.in_features for m in mods)
        stored = sum(m.weight.numel() * 4 + (m.weight_scale.numel() + m.weight_zero.numel()) * m.weight_scale.element_size()
                     + m.outliers_per_row * m.out_features * (4 + m.weight_scale.element_size())
                     for m in mods)
        meta = {"int4_weights": n, "int4_bits_per_weight": round(8 * stored / max(n, 1), 3),
                "int4_group_size": self.group_size, "int4_method": self.method}
        if self.zero_point != "float":
            meta["int4_zero_point"] = self.zero_point
        if self.outliers:
            meta["int4_outlier_fraction"] = self.outliers
        return meta
