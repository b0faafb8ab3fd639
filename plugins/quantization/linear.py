"""Finding and replacing the linear layers a weight plugin converts."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from hf_accel.errors import OptionError
from hf_accel.patching import Patcher
from hf_accel.plugin import Family, ModelKind, Plugin


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear with a transposed weight)."""
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def linear_parts(module: nn.Module) -> tuple[int, int, torch.Tensor, torch.Tensor | None]:
    """(in_features, out_features, weight as (out, in), bias) of a linear layer of either kind."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features, module.weight, module.bias
    return module.weight.shape[0], module.nf, module.weight.t(), module.bias


def iter_linears(model: nn.Module, skip: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    """Yield (qualified name, module) for every linear layer whose name matches no pattern in `skip`.

    A pattern matches the full name or its last component (`lm_head` skips `lm_head`, `*.gate` skips every gate)."""
    for name, module in model.named_modules():
        if is_linear(module) and not any(
            fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], pat) for pat in skip
        ):
            yield name, module


def replace_linears(
    model: nn.Module, patcher: Patcher, skip: tuple[str, ...], make: Callable[[nn.Module], nn.Module]
) -> int:
    """Swap each selected linear for `make(linear)`; returns how many were replaced."""
    targets = list(iter_linears(model, skip))
    for name, linear in targets:
        with torch.no_grad():
            patcher.swap_module(model, name, make(linear), rewrites_weights=True)
    return len(targets)


@dataclass
class WeightOnlyLinearPlugin(Plugin):
    """Shared plumbing of the weight-only linear formats: pick the layers, swap them, rebuild them for loading.

    A format subclass sets `name`, adds its own options and implements `quantize(linear)` (float layer → packed
    module) and `skeleton(linear)` (an empty packed module for saved weights to load into)."""

    family = Family.QUANTIZATION
    supported_kinds = frozenset({ModelKind.CAUSAL_LM, ModelKind.TRANSFORMERS, ModelKind.DIFFUSION_MODEL})
    conflicts_with = ("family:quantization", "family:compression")
    rewrites_weights = True

    skip: tuple[str, ...] = ("lm_head",)  # module-name patterns kept in full precision

    def __post_init__(self):
        if any(not p for p in self.skip):
            raise OptionError(f"plugin {self.name!r}: option 'skip' must not contain empty patterns")

    def quantize(self, linear: nn.Module) -> nn.Module:
        raise NotImplementedError

    def skeleton(self, linear: nn.Module) -> nn.Module:
        raise NotImplementedError

    def apply(self, model, patcher):
        if replace_linears(model, patcher, self.skip, self.quantize) == 0:
            raise OptionError(
                f"plugin {self.name!r} found no linear layer to quantize in {type(model).__name__} (skip={list(self.skip)})"
            )

    def prepare_for_loading(self, model, patcher):
        replace_linears(model, patcher, self.skip, self.skeleton)
