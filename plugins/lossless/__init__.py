"""`lossless`: bf16 linears stored in ~11.5-12 bits per weight, bit-exact, with fused decode + GEMV kernels.

The formats and kernels are in `hf_accel.kernels.lossless`: sign + mantissa kept as a byte, the exponent as a
fixed-rate code for a per-layer window, exact escapes in a per-row side list. Two layouts, chosen per layer:
"code4" (4-bit code, window of 16 exponents, escape capacity set by the shape: 12.03 bits/weight on the 8B shapes)
and "code3" (3-bit code, window of 8, every escape stored in 32 bits: 11 bits + 32 x escape rate). The plugin
- analyses every selected linear (`analyze`): exponent histogram, window coverage against the 15 most common
  exponents, escape rates of both windows, the entropy and the Huffman (DFloat11-style) size, and chooses per
  layer the smaller layout (option `layout`: "auto"; "code4" or "code3" force one where it applies). A layer that
  fits neither (or whose weight is not bf16, is tied to another parameter, or has an odd number of inputs) is
  reported and left in bf16, and its name is recorded in the option `keep`; code3 layers are recorded with their
  escape counts in the option `code3`, so a saved artifact rebuilds exactly the same skeletons when it loads
  (artifacts saved before code3 existed have neither option and load as code4);
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
from typing import Any, Literal

import torch
from torch import nn

from hf_accel.errors import OptionError, UnsupportedModelError
from hf_accel.kernels import lossless as KL
from hf_accel.plugin import Family, ModelKind, Plugin
from hf_accel.plugins.quantization.linear import iter_linears, linear_parts


class LosslessLinear(nn.Module):
    """y = x @ W.T + b with W (bf16 [out, in]) stored losslessly in a fixed-rate exponent code.

    Parameters (all frozen): `weight` = sign|mantissa bytes (uint8 [out, in]; keeps the name `weight` so tied-weight
    logic and lookups of `.weight` find the layer), `weight_base` (int32 [1]), `weight_escape_ptr` (int32
    [out + 1]), and per layout: code4 `weight_code` (uint8 [out, in / 2]), `weight_escape_col` (int32 [cap]),
    `weight_escape_val` (int16 [cap]); code3 `weight_code3` (uint8 [out, 3 in / 8]), `weight_escape` (int32 [cap]:
    column | bf16 bits << 16). Distinct names make a checkpoint of one layout fail to load into the other."""

    def __init__(self, in_features: int, out_features: int, bias: bool, capacity: int, bias_dtype: torch.dtype,
                 exact: bool = False, device=None, code_bits: int = 4):
        super().__init__()
        if code_bits not in (3, 4):
            raise ValueError(f"code_bits must be 3 or 4, got {code_bits}")
        if code_bits == 3 and not KL.code3_supported(in_features):
            raise ValueError(f"the 3-bit layout needs in_features % 8 == 0 and <= {KL.MAX_K3}, got {in_features}")
        self.in_features, self.out_features, self.exact, self.code_bits = in_features, out_features, exact, code_bits
        frozen = dict(requires_grad=False)
        u8 = dict(dtype=torch.uint8, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **u8), **frozen)
        if code_bits == 4:
            self.weight_code = nn.Parameter(torch.empty(out_features, in_features // 2, **u8), **frozen)
        else:
            self.weight_code3 = nn.Parameter(torch.empty(out_features, 3 * (in_features // 8), **u8), **frozen)
        self.weight_base = nn.Parameter(torch.empty(1, **i32), **frozen)
        self.weight_escape_ptr = nn.Parameter(torch.empty(out_features + 1, **i32), **frozen)
        if code_bits == 4:
            self.weight_escape_col = nn.Parameter(torch.empty(capacity, **i32), **frozen)
            self.weight_escape_val = nn.Parameter(torch.empty(capacity, dtype=torch.int16, device=device), **frozen)
        else:
            self.weight_escape = nn.Parameter(torch.empty(capacity, **i32), **frozen)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), **frozen) if bias else None

    @classmethod
    def skeleton_of(cls, linear: nn.Module, max_escape_rate: float, exact: bool = False,
                    code3_capacity: int | None = None) -> "LosslessLinear":
        """A code4 skeleton (capacity from the shape), or a code3 one when `code3_capacity` is given."""
        in_f, out_f, weight, bias = linear_parts(linear)
        bits, cap = (4, KL.capacity(out_f, in_f, max_escape_rate)) if code3_capacity is None else (3, code3_capacity)
        return cls(in_f, out_f, bias is not None, cap, bias.dtype if bias is not None else torch.bfloat16, exact,
                   weight.device, bits)

    @classmethod
    def from_linear(cls, linear: nn.Module, max_escape_rate: float, exact: bool = False,
                    code_bits: int = 4) -> "LosslessLinear":
        """Raises ValueError when the weight does not fit the layout (the caller keeps it bf16)."""
        _, _, weight, bias = linear_parts(linear)
        w = weight.detach()
        if code_bits == 3:
            parts = KL.encode3(w)
            module = cls.skeleton_of(linear, max_escape_rate, exact, code3_capacity=parts["esc"].numel())
        else:
            module = cls.skeleton_of(linear, max_escape_rate, exact)
            parts = KL.encode(w, module.weight_escape_col.numel())
        for key, name in (PARTS3 if code_bits == 3 else PARTS).items():
            getattr(module, name).data.copy_(parts[key])
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def parts(self) -> tuple[torch.Tensor, ...]:
        if self.code_bits == 3:
            return (self.weight, self.weight_code3, self.weight_base, self.weight_escape_ptr, self.weight_escape)
        return (self.weight, self.weight_code, self.weight_base, self.weight_escape_ptr, self.weight_escape_col,
                self.weight_escape_val)

    def dequantize(self) -> torch.Tensor:
        """The original bf16 weight, bit for bit."""
        if self.code_bits == 3:
            return KL.lossless3_decode(*self.parts())
        return KL.lossless_decode(*self.parts())

    @property
    def escapes(self) -> int:
        return int(self.weight_escape_ptr[-1])

    def stored_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)  # the weights are bf16: compute as the bf16 linear would
        if self.code_bits == 3:
            return KL.lossless3_linear(x, *self.parts(), self.bias, self.exact)
        return KL.lossless_linear(x, *self.parts(), self.bias, self.exact)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"lossless bf16 (code{self.code_bits}, {self.escapes} escapes){', exact' if self.exact else ''}")


PARTS = {"sm": "weight", "code": "weight_code", "base": "weight_base", "ptr": "weight_escape_ptr",
         "col": "weight_escape_col", "val": "weight_escape_val"}
PARTS3 = {"sm": "weight", "code": "weight_code3", "base": "weight_base", "ptr": "weight_escape_ptr",
          "esc": "weight_escape"}


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
    base3, _ = KL.best_window(hist, KL.WINDOW3)
    escapes3 = KL.escape_count(hist, base3, KL.WINDOW3)
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
        "code4_bits_per_weight": KL.format_bits_per_weight(n, k, max_escape_rate) if escapes <= cap else None,
        "window3_base": base3,
        "escapes3": escapes3,
        "escape_rate3": escapes3 / (n * k),
        "code3_bits_per_weight": (KL.format3_bits_per_weight(n, k, escapes3)
                                  if KL.code3_supported(k) and escapes3 <= KL.MAX_ESCAPE_RATE3 * n * k else None),
        "histogram": {int(e): int(c) for e, c in enumerate(hist.tolist()) if c},
    }


@dataclass
class Lossless(Plugin):
    """bf16 linears in ~11.5-12 bits/weight (fixed-rate exponent code + exact escapes): bit-exact weights, fused GEMV."""

    name = "lossless"
    family = Family.COMPRESSION
    supported_kinds = frozenset({ModelKind.CAUSAL_LM, ModelKind.TRANSFORMERS, ModelKind.DIFFUSION_MODEL})
    conflicts_with = ("family:quantization", "family:compression")
    rewrites_weights = True

    skip: tuple[str, ...] = ()  # module-name patterns left in bf16 (lossless needs no exceptions; for control)
    keep: tuple[str, ...] = ()  # layers left in bf16 by the analysis (recorded at apply so artifacts reload)
    layout: Literal["auto", "code4", "code3"] = "auto"  # auto: the smaller per layer; code3: wherever it applies
    code3: tuple[str, ...] = ()  # "layer=escapes" of the code3 layers (recorded at apply: their skeletons' sizes)
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
        self._code3 = {}
        for entry in self.code3:
            name, _, count = entry.rpartition("=")
            if not name or not count.isdigit():
                raise OptionError(f"plugin 'lossless': option 'code3' entries are 'layer=escapes', got {entry!r}")
            self._code3[name] = int(count)
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
                row["layout"] = self.choose_layout(row)
                if reason is None and row["layout"] is None:
                    reason = (f"compresses poorly: {row['escape_rate']:.2e} of its weights fall outside the best "
                              f"16-exponent window (max_escape_rate={self.max_escape_rate:.2e}) and "
                              f"{row['escape_rate3']:.2e} outside the best 8-exponent window "
                              f"(max {KL.MAX_ESCAPE_RATE3:.2e}{'' if KL.code3_supported(in_f) else ', or K unsupported'})")
            row["decision"] = "bf16" if reason else "lossless"
            row["reason"] = reason
            if reason:
                row["layout"] = None
            rows.append(row)
        return rows

    def choose_layout(self, row: dict[str, Any]) -> str | None:
        """"code3" / "code4" / None (fits neither): the smaller (auto), or the forced one where it applies."""
        bits = {"code3": row["code3_bits_per_weight"], "code4": row["code4_bits_per_weight"]}
        fits = {name: b for name, b in bits.items() if b is not None}
        if not fits:
            return None
        if self.layout in fits:
            return self.layout
        return min(fits, key=lambda name: (fits[name], name != "code4"))  # a tie keeps the older layout

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
        kept, code3 = [], {}
        for row in self.report:
            if row["decision"] != "lossless":
                kept.append(row["layer"])
                continue
            linear = model.get_submodule(row["layer"])
            with torch.no_grad():
                try:
                    new = LosslessLinear.from_linear(linear, self.max_escape_rate, self.exact,
                                                     3 if row["layout"] == "code3" else 4)
                except ValueError as e:  # not expected after the analysis; keep the layer rather than fail
                    row.update(decision="bf16", reason=str(e), layout=None)
                    kept.append(row["layer"])
                    continue
            if new.code_bits == 3:
                code3[row["layer"]] = new.weight_escape.numel()
            patcher.swap_module(model, row["layer"], new, rewrites_weights=True)
        if not any(r["decision"] == "lossless" for r in self.report):
            raise OptionError(
                "plugin 'lossless' kept every linear in bf16: "
                + "; ".join(f"{r['layer']}: {r['reason']}" for r in self.report[:5])
            )
        self.keep = tuple(sorted(set(self.keep) | set(kept)))
        self._code3 = code3
        self.code3 = tuple(f"{name}={count}" for name, count in code3.items())
        self._record(model, patcher)

    def prepare_for_loading(self, model, patcher):
        for name, linear in list(iter_linears(model, self.skip)):
            if name in self.keep:
                continue
            skeleton = LosslessLinear.skeleton_of(linear, self.max_escape_rate, self.exact, self._code3.get(name))
            patcher.swap_module(model, name, skeleton, rewrites_weights=True)

    # -- reporting --------------------------------------------------------------------------------------------
    def sizes(self, model: nn.Module) -> dict[str, Any]:
        layers = [m for m in model.modules() if isinstance(m, LosslessLinear)]
        n = sum(m.in_features * m.out_features for m in layers)
        stored = sum(m.stored_bytes() for m in layers)
        return {
            "lossless_layers": len(layers),
            "code3_layers": sum(1 for m in layers if m.code_bits == 3),
            "code4_layers": sum(1 for m in layers if m.code_bits == 4),
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
        return {**self.sizes(model), "kept_bf16": list(self.keep), "code3": list(self.code3)}


__all__ = ["Lossless", "LosslessLinear", "analyze_weight"]
