"""Small real plugins used by the core's tests (registered per test, never installed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hf_accel.errors import OptionError
from hf_accel.plugin import Family, ModelKind, Plugin


@dataclass
class ScaleLogits(Plugin):
    """Runtime patch: multiplies the logits by `factor` through a forward hook (removable)."""

    name = "scale_logits"
    family = Family.RUNTIME
    supported_kinds = frozenset({ModelKind.CAUSAL_LM})
    factor: float = 2.0
    mode: Literal["mul", "add"] = "mul"

    def __post_init__(self):
        if self.factor <= 0:
            raise OptionError("factor must be > 0")

    def apply(self, model, patcher):
        def hook(module, args, output):
            output.logits = output.logits * self.factor if self.mode == "mul" else output.logits + self.factor
            return output

        patcher.add_hook("logits scale hook", model.register_forward_hook(hook).remove)
        patcher.set_attr(model, "scaled_by", self.factor)


@dataclass
class ExplodeAfterChanges(Plugin):
    """Changes the model (rewrites a weight, patches an attribute), then fails: apply must roll all back."""

    name = "explode"
    family = Family.KV_CACHE
    supported_kinds = frozenset({ModelKind.CAUSAL_LM})

    def apply(self, model, patcher):
        emb = model.get_input_embeddings()
        patcher.swap_module(model, _name_of(model, emb), torch.nn.Embedding(emb.num_embeddings, emb.embedding_dim), rewrites_weights=True)
        patcher.set_attr(model, "generate", lambda *a, **k: None)
        raise RuntimeError("boom")


@dataclass
class OtherQuant(Plugin):
    """A second quantization plugin, to exercise family conflicts."""

    name = "otherquant"
    family = Family.QUANTIZATION
    conflicts_with = ("family:quantization",)
    bits: int = 4

    def apply(self, model, patcher):
        pass


@dataclass
class DiffusionOnly(Plugin):
    name = "diffusion_only"
    family = Family.DIFFUSION_CACHE
    supported_kinds = frozenset({ModelKind.DIFFUSION_PIPELINE})

    def apply(self, model, patcher):
        pass


def _name_of(root, module):
    return next(n for n, m in root.named_modules() if m is module)


ALL = (ScaleLogits, ExplodeAfterChanges, OtherQuant, DiffusionOnly)
