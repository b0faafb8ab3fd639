"""W8A8 for diffusion denoisers: int8 or fp8 weights *and* activations in the linear (and 1x1 conv) layers.

A denoiser step is compute-bound (thousands of tokens per call), so the weight-only formats (`int8`, `fp8`) do not
make it faster; quantizing the activations too lets the matmul itself run on the 8-bit tensor cores:

* `w8a8(format=int8)`: weights int8 per output channel (symmetric), activations int8 with a dynamic per-token scale
  (absmax of each row, computed every call); on CUDA `torch._int_mm` (int8 x int8 -> int32) then both scales.
* `w8a8(format=fp8)`: weights float8_e4m3fn per output channel, activations e4m3 with a dynamic per-token scale;
  on CUDA `torch._scaled_mm` with row-wise scales (SM89+), output in bf16.

Elsewhere (CPU, or a shape the 8-bit kernels refuse) the same quantized numbers are multiplied in float32, so CPU
results show the real quantization error. A 1x1 stride-1 Conv2d (SD1.5's `proj_in`/`proj_out`, resnet shortcuts)
is a linear over channels and is converted too (`convs=true`). Layers whose in/out features are not multiples of 16
stay in float (the 8-bit GEMMs need aligned shapes), as do the layers that `skip` names: by default the timestep /
text embedders and the final norm, which are tiny and sensitive.

The matmul is one op, `hf_accel::w8a8_diffusion_linear` (kernels/w8a8_act.py: a Triton per-token quantizer, the
8-bit cuBLAS GEMM, a Triton int8 epilogue), so torch.compile and CUDA graphs take it whole: apply, then compile.
Applies to a diffusers model, or to a pipeline's denoiser through `accel=`; it is the quantization half of the
joint cache+quant calibration (`diffusion_calibrate(..., accel="w8a8")`, see diffusion_cache/calibrate.py).

    pipe = DiffusionPipeline.from_pretrained(id, accel="w8a8(format=fp8)+fbcache(threshold=0.1)")
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from hf_accel.errors import OptionError
from hf_accel.kernels.w8a8_act import w8a8_linear
from hf_accel.plugin import Family, ModelKind, Plugin

FORMATS = ("int8", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0
ALIGN = 16


def quantize_weight(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (codes (out, in) int8 / float8_e4m3fn, scale (out,) float32), symmetric per row."""
    w = weight.detach().float()
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-12)
    q = w / scale[:, None]
    q = q.round().clamp(-qmax, qmax).to(torch.int8) if fmt == "int8" else q.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def w8a8_matmul(x2: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                fmt: str) -> torch.Tensor:
    """y = dequant(quant(x2) @ weight.T) + bias for x2 (M, K): the op `hf_accel::w8a8_diffusion_linear`
    (kernels/w8a8_act.py: 8-bit GEMMs on CUDA, float32 reference elsewhere)."""
    return w8a8_linear(x2, weight, w_scale, bias, fmt)


class W8A8Linear(nn.Module):
    """A linear (or 1x1 conv, `conv=True`) with 8-bit weights and dynamically quantized 8-bit activations.

    State: `weight` codes (out, in), `weight_scale` (out,) float32, `bias` in the model dtype. The same keys as the
    float layer, so checkpoints and PEFT lookups of `.weight` keep working."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, fmt: str,
                 conv: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.conv = in_features, out_features, fmt, conv
        code = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=code, device=device), **frozen)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), **frozen)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), **frozen) if bias else None

    @staticmethod
    def parts(module: nn.Module) -> tuple[int, int, torch.Tensor, torch.Tensor | None, bool]:
        if isinstance(module, nn.Conv2d):
            w = module.weight
            return w.shape[1], w.shape[0], w.reshape(w.shape[0], w.shape[1]), module.bias, True
        return module.in_features, module.out_features, module.weight, module.bias, False

    @classmethod
    def skeleton_of(cls, module: nn.Module, fmt: str) -> "W8A8Linear":
        in_f, out_f, weight, bias, conv = cls.parts(module)
        return cls(in_f, out_f, bias is not None, weight.dtype, fmt, conv, weight.device)

    @classmethod
    def from_module(cls, module: nn.Module, fmt: str) -> "W8A8Linear":
        new = cls.skeleton_of(module, fmt)
        _, _, weight, bias, _ = cls.parts(module)
        q, scale = quantize_weight(weight, fmt)
        new.weight.data.copy_(q)
        new.weight_scale.data.copy_(scale)
        if bias is not None:
            new.bias.data.copy_(bias.detach())
        return new

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:  # (B, C, H, W): a linear over channels, one token per pixel
            b, c, h, w = x.shape
            x2 = x.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
            y = w8a8_matmul(x2, self.weight, self.weight_scale, self.bias, self.fmt)
            return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        shape = x.shape
        y = w8a8_matmul(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.weight_scale, self.bias, self.fmt)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "conv1x1" if self.conv else "linear"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, w8a8 {self.fmt} per-channel/per-token"


def convertible(module: nn.Module, convs: bool) -> bool:
    if type(module) is nn.Linear:
        shape = (module.in_features, module.out_features)
    elif convs and type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1) \
            and module.padding in ((0, 0), "valid") and module.groups == 1 and module.dilation == (1, 1):
        shape = (module.in_channels, module.out_channels)
    else:
        return False
    return all(d % ALIGN == 0 for d in shape)


@dataclass
class W8A8Diffusion(Plugin):
    """int8 or fp8 weights and dynamic per-token activations (W8A8) in a diffusion denoiser's linears and 1x1 convs."""

    name = "w8a8"
    family = Family.QUANTIZATION
    supported_kinds = frozenset({ModelKind.DIFFUSION_MODEL})
    conflicts_with = ("family:quantization", "family:compression")
    rewrites_weights = True

    format: str = "int8"  # int8 (torch._int_mm) or fp8 (e4m3, torch._scaled_mm)
    convs: bool = True  # also 1x1 stride-1 Conv2d layers
    # fnmatch on the full name or its last component. Kept in float by default: the timestep / text embedders, and
    # the AdaLN modulation linears of DiTs (one row per image: no 8-bit GEMM speed to gain, and sensitive)
    skip: tuple[str, ...] = ("*time_emb*", "*timestep_embedder*", "time_text_embed.*", "*time_embedding*",
                             "norm_out.*", "*add_embedding*", "*norm1.linear", "*norm1_context.linear",
                             "*.norm.linear", "*ada[lL][nN]*")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise OptionError(f"plugin 'w8a8': format must be one of {list(FORMATS)}, got {self.format!r}")
        if any(not p for p in self.skip):
            raise OptionError("plugin 'w8a8': option 'skip' must not contain empty patterns")

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for name, module in model.named_modules():
            if isinstance(module, W8A8Linear) or not convertible(module, self.convs):
                continue
            last = name.rsplit(".", 1)[-1]
            if not any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p) for p in self.skip):
                out.append((name, module))
        return out

    def _swap(self, model, patcher, make) -> int:
        targets = self.targets(model)
        for name, module in targets:
            with torch.no_grad():
                patcher.swap_module(model, name, make(module), rewrites_weights=True)
        return len(targets)

    def apply(self, model, patcher):
        if self._swap(model, patcher, lambda m: W8A8Linear.from_module(m, self.format)) == 0:
            raise OptionError(
                f"plugin 'w8a8' found no linear or 1x1 conv layer with in/out features divisible by {ALIGN} in "
                f"{type(model).__name__} (skip={list(self.skip)}, convs={self.convs})"
            )

    def prepare_for_loading(self, model, patcher):
        self._swap(model, patcher, lambda m: W8A8Linear.skeleton_of(m, self.format))

    def card_metadata(self, model):
        layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
        return {"w8a8_format": self.format, "w8a8_layers": len(layers),
                "w8a8_weights": sum(m.weight.numel() for m in layers)}
