"""`lossless`: bf16 linears stored in 12 bits per weight, bit-exact, with fused decode + GEMV kernels.

The format and kernels are in `hf_accel.kernels.lossless` (a 4-bit code for a per-layer window of 15 exponents,
sign + mantissa kept as a byte, exact escapes in a per-row side list). The plugin
- analyses every selected linear (`analyze`): exponent histogram, window coverage against the 15 most common
  exponents, escape rate, the entropy and the Huffman (DFloat11-style) size, and chooses per layer: a layer whose
  escapes exceed `max_escape_rate` (or whose weight is not bf16, is tied to another parameter, or has an odd
  number of inputs) is reported and left in bf16, and its name is recorded in the option `keep`, so a saved
  artifact rebuilds exactly the same layers when it loads;
- swaps the others for `LosslessLinear` (through the Patcher: atomic; the original weights are released at commit).

Outputs: the decoded weights are bit-identical to the originals. With `exact=True` every forward decodes to bf16
and calls F.linear, so the logits are bit-identical to the bf16 model's on any device (that is also what the CPU
path and the CUDA prefill path do). With `exact=False` (default) CUDA batches of 1..16 rows go through the fused
kernels: the same weights and fp32 accumulation, in the kernel's own order, so an output can differ from cuBLAS's
bf16 result in its last bit.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_accel.errors import OptionError, UnsupportedModelError
from hf_accel.kernels import lossless as KL
from hf_accel.plugin import Family, ModelKind, Plugin
from hf_accel.plugins.quantization.linear import iter_linears, linear_parts


class LosslessLinear(nn.Module):
    """y = x @ W.T + b with W (bf16 [out, in]) stored losslessly in 12 bits per weight.

    Parameters (all frozen): `weight` = sign|mantissa bytes (uint8 [out, in]; keeps the name `weight` so tied-weight
    logic and lookups of `.weight` find the layer), `weight_code` (uint8 [out, in / 2]), `weight_base` (int32 [1]),
    `weight_escape_ptr` (int32 [out + 1]), `weight_escape_col` (int32 [cap]), `weight_escape_val` (int16 [cap])."""

    def __init__(self, in_features: int, out_features: int, bias: bool, capacity: int, bias_dtype: torch.dtype,
                 exact: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.exact = in_features, out_features, exact
        frozen = dict(requires_grad=False)
        u8 = dict(dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **u8), **frozen)
        self.weight_code = nn.Parameter(torch.empty(out_features, in_features // 2, **u8), **frozen)
        self.weight_base = nn.Parameter(torch.empty(1, dtype=torch.int32, device=device), **frozen)
        self.weight_escape_ptr = nn.Parameter(torch.empty(out_features + 1, dtype=torch.int32, device=device), **frozen)
        self.weight_escape_col = nn.Parameter(torch.empty(capacity, dtype=torch.int32, device=device), **frozen)
        self.weight_escape_val = nn.Parameter(torch.empty(capacity, dtype=torch.int16, device=device), **frozen)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), **frozen) if bias else None

    @classmethod
    def skeleton_of(cls, linear: nn.Module, max_escape_rate: float, exact: bool = False) -> "LosslessLinear":
        in_f, out_f, weight, bias = linear_parts(linear)
        cap = KL.capacity(out_f, in_f, max_escape_rate)
        return cls(in_f, out_f, bias is not None, cap, bias.dtype if bias is not None else torch.bfloat16, exact,
                   weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Module, max_escape_rate: float, exact: bool = False) -> "LosslessLinear":
        """Raises ValueError when the weight needs more escapes than the capacity (the caller keeps it bf16)."""
        _, _, weight, bias = linear_parts(linear)
        module = cls.skeleton_of(linear, max_escape_rate, exact)
        parts = KL.encode(weight.detach(), module.weight_escape_col.numel())
        for key, name in PARTS.items():
            getattr(module, name).data.copy_(parts[key])
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def parts(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.weight_code, self.weight_base, self.weight_escape_ptr, self.weight_escape_col,
                self.weight_escape_val)

    def dequantize(self) -> torch.Tensor:
        """The original bf16 weight, bit for bit."""
        return KL.lossless_decode(*self.parts())

    @property
    def escapes(self) -> int:
        return int(self.weight_escape_ptr[-1])

    def stored_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)  # the weights are bf16: compute as the bf16 linear would
        return KL.lossless_linear(x, *self.parts(), self.bias, self.exact)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"lossless bf16 (12-bit exponent code){', exact' if self.exact else ''}")


PARTS = {"sm": "weight", "code": "weight_code", "base": "weight_base", "ptr": "weight_escape_ptr",
         "col": "weight_escape_col", "val": "weight_escape_val"}


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every qualified name it is reachable under (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            names.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def analyze_weight(weight: torch.Tensor, max_escape_rate: float) -> dict[str, Any]:
    """Exponent statistics of one bf16 weight [N, K] and what each encoding would store."""
    n, k = weight.shape
    hist = KL.exponent_histogram(weight)
    base, covered = KL.best_window(hist)
    top15 = int(torch.sort(hist[1:], descending=True).values[:KL.WINDOW].sum())  # any 15 nonzero exponents
    nonzero = int(hist.sum() - hist[0])
    escapes = KL.escape_count(hist, base)
    cap = KL.capacity(n, k, max_escape_rate)
    return {
        "shape": [n, k],
        "window_base": base,
        "window_coverage": (covered + int(hist[0])) / (n * k),
        "top15_coverage": (top15 + int(hist[0])) / (n * k),  # the best 15 exponents, not necessarily consecutive
        "zero_exponent": int(hist[0]),
        "nonzero": nonzero,
        "escapes": escapes,
        "escape_rate": escapes / (n * k),
        "escape_capacity": cap,
        "exponent_entropy_bits": KL.entropy_bits(hist),
        "huffman_bits_per_weight": KL.huffman_bits_per_weight(hist),
        "fixed_bits_per_weight": KL.format_bits_per_weight(n, k, max_escape_rate),
        "histogram": {int(e): int(c) for e, c in enumerate(hist.tolist()) if c},
    }


@dataclass
class Lossless(Plugin):
    """bf16 linears in 12 bits/weight (fixed-rate exponent code + exact escapes): bit-exact weights, fused GEMV."""

    name = "lossless"
    family = Family.COMPRESSION
    supported_kinds = frozenset({ModelKind.CAUSAL_LM, ModelKind.TRANSFORMERS, ModelKind.DIFFUSION_MODEL})
    conflicts_with = ("family:quantization", "family:compression")
    rewrites_weights = True

    skip: tuple[str, ...] = ()  # module-name patterns left in bf16 (lossless needs no exceptions; for control)
    keep: tuple[str, ...] = ()  # layers left in bf16 by the analysis (recorded at apply so artifacts reload)
    max_escape_rate: float = KL.DEFAULT_MAX_ESCAPE_RATE  # escapes per weight above which a layer stays bf16
    exact: bool = False  # always decode to bf16 + F.linear: logits bit-identical to the bf16 model, slower decode

    def __post_init__(self):
        if any(not p for p in self.skip):
            raise OptionError("plugin 'lossless': option 'skip' must not contain empty patterns")
        if not 0 < self.max_escape_rate <= 0.0625:
            raise OptionError(
                f"plugin 'lossless': option 'max_escape_rate' must be in (0, 0.0625], got {self.max_escape_rate}; "
                "above ~6% of weights the side list costs more than the 4 bits the code saves"
            )
        self.report: list[dict[str, Any]] = []

    # -- analysis ---------------------------------------------------------------------------------------------
    def analyze(self, model: nn.Module) -> list[dict[str, Any]]:
        """One row per selected linear: statistics, and `decision` ("lossless" or "bf16") with the reason."""
        tied = _tied_names(model)
        rows = []
        for name, linear in iter_linears(model, self.skip):
            in_f, out_f, weight, _ = linear_parts(linear)
            row: dict[str, Any] = {"layer": name, "shape": [out_f, in_f], "dtype": str(weight.dtype).replace("torch.", "")}
            reason = None
            others = [t for t in tied.get(id(linear.weight), []) if not t.startswith(name + ".")]
            if name in self.keep:
                reason = "listed in keep"
            elif weight.dtype != torch.bfloat16:
                reason = f"weight is {row['dtype']}; lossless stores bf16 weights"
            elif in_f % 2:
                reason = f"odd number of inputs ({in_f})"
            elif others:
                reason = f"weight tied to {others[0]}"
            if weight.dtype == torch.bfloat16 and weight.device.type != "meta":
                row.update(analyze_weight(weight.detach(), self.max_escape_rate))
                if reason is None and row["escapes"] > row["escape_capacity"]:
                    reason = (f"compresses poorly: {row['escape_rate']:.2e} of its weights fall outside the best "
                              f"15-exponent window (max_escape_rate={self.max_escape_rate:.2e})")
            row["decision"] = "bf16" if reason else "lossless"
            row["reason"] = reason
            rows.append(row)
        return rows

    def check(self, model):
        super().check(model)
        if not any(linear_parts(m)[2].dtype == torch.bfloat16 for _, m in iter_linears(model, self.skip)):
            dtypes = sorted({str(linear_parts(m)[2].dtype) for _, m in iter_linears(model, self.skip)})
            raise UnsupportedModelError(
                f"plugin 'lossless' compresses bf16 weights; {type(model).__name__} has no bf16 linear layer "
                f"(found {', '.join(dtypes) or 'no linear layers'}). Load it with dtype=torch.bfloat16 "
                "(or model.to(torch.bfloat16)) first."
            )

    # -- apply / load -----------------------------------------------------------------------------------------
    def apply(self, model, patcher):
        self.report = self.analyze(model)
        kept = []
        for row in self.report:
            if row["decision"] != "lossless":
                kept.append(row["layer"])
                continue
            linear = model.get_submodule(row["layer"])
            with torch.no_grad():
                try:
                    new = LosslessLinear.from_linear(linear, self.max_escape_rate, self.exact)
                except ValueError as e:  # not expected after the analysis; keep the layer rather than fail
                    row.update(decision="bf16", reason=str(e))
                    kept.append(row["layer"])
                    continue
            patcher.swap_module(model, row["layer"], new, rewrites_weights=True)
        if not any(r["decision"] == "lossless" for r in self.report):
            raise OptionError(
                "plugin 'lossless' kept every linear in bf16: "
                + "; ".join(f"{r['layer']}: {r['reason']}" for r in self.report[:5])
            )
        self.keep = tuple(sorted(set(self.keep) | set(kept)))
        self._record(model, patcher)

    def prepare_for_loading(self, model, patcher):
        for name, linear in list(iter_linears(model, self.skip)):
            if name in self.keep:
                continue
            patcher.swap_module(model, name, LosslessLinear.skeleton_of(linear, self.max_escape_rate, self.exact),
                                rewrites_weights=True)

    # -- reporting --------------------------------------------------------------------------------------------
    def sizes(self, model: nn.Module) -> dict[str, Any]:
        layers = [m for m in model.modules() if isinstance(m, LosslessLinear)]
        n = sum(m.in_features * m.out_features for m in layers)
        stored = sum(m.stored_bytes() for m in layers)
        return {
            "lossless_layers": len(layers),
            "kept_bf16_layers": len(self.keep),
            "lossless_weights": n,
            "bf16_bytes": 2 * n,
            "stored_bytes": stored,
            "bits_per_weight": 8 * stored / max(1, n),
            "size_ratio": stored / max(1, 2 * n),
        }

    def _record(self, model, patcher):
        """Size facts for the card (through the patcher: a failed spec leaves no record behind)."""
        from hf_accel.card import METRICS_ATTR

        sizes = self.sizes(model)
        records = list(getattr(model, METRICS_ATTR, None) or [])
        record_metric = lambda rec: records.append(dict(rec))
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        common = {"model": name, "spec": "lossless", "command": "hf_accel.apply(model, 'lossless')",
                  "date": datetime.date.today().isoformat()}
        record_metric({"metric": "lossless_bits_per_weight", "value": round(sizes["bits_per_weight"], 4), **common})
        record_metric({"metric": "lossless_size_vs_bf16", "value": round(sizes["size_ratio"], 4), **common})
        record_metric({"metric": "lossless_layers_kept_bf16", "value": sizes["kept_bf16_layers"], **common})
        patcher.set_attr(model, METRICS_ATTR, records)

    def card_metadata(self, model):
        return {**self.sizes(model), "kept_bf16": list(self.keep)}


__all__ = ["Lossless", "LosslessLinear", "analyze_weight"]
