"""The plugin protocol.

A plugin is one small dataclass: its fields are its options (typed, with defaults), its class attributes declare
what it is, and `apply()` changes a model through a `Patcher`, which records every change so that the core can roll
back a failed spec and `hf_accel.remove()` can undo what is undoable. Everything else (discovery, validation,
ordering, conflicts, saving) is the core's job.

    @dataclass
    class SinkPlugin(Plugin):
        '''Attention sinks + recent window (StreamingLLM, arXiv:2309.17453).'''
        name = "sink"
        family = Family.KV_CACHE
        window: int = 1024
        sinks: int = 4

        def apply(self, model, patcher):
            patcher.set_attr(model, "generate", ...)
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import UnsupportedModelError

if TYPE_CHECKING:
    from .patching import Patcher


class Family(str, enum.Enum):
    PRUNING = "pruning"
    QUANTIZATION = "quantization"
    COMPRESSION = "compression"
    RUNTIME = "runtime"
    ATTENTION = "attention"
    KV_CACHE = "kv_cache"
    DIFFUSION_CACHE = "diffusion_cache"
    SPECULATIVE = "speculative"


# Weights first (prune, then quantize or compress what is left), then the runtime that executes them, then what
# rides on the runtime (attention, KV policy, caches), and the decoding strategy last.
DEFAULT_ORDER = {
    Family.PRUNING: 100,
    Family.QUANTIZATION: 200,
    Family.COMPRESSION: 200,
    Family.RUNTIME: 300,
    Family.ATTENTION: 400,
    Family.KV_CACHE: 500,
    Family.DIFFUSION_CACHE: 500,
    Family.SPECULATIVE: 600,
}


class ModelKind(str, enum.Enum):
    CAUSAL_LM = "causal_lm"  # transformers model with generate()
    TRANSFORMERS = "transformers"  # any other transformers PreTrainedModel
    DIFFUSION_PIPELINE = "diffusion_pipeline"
    DIFFUSION_MODEL = "diffusion_model"  # a diffusers ModelMixin (UNet, DiT, ...)
    MODULE = "module"  # a plain torch.nn.Module


def model_kind(obj: Any) -> ModelKind:
    """Classify by base classes; imports stay lazy so the core works without diffusers installed."""
    names = {c.__module__.split(".")[0] + "." + c.__name__ for c in type(obj).__mro__}
    if "diffusers.DiffusionPipeline" in names:
        return ModelKind.DIFFUSION_PIPELINE
    if "diffusers.ModelMixin" in names:
        return ModelKind.DIFFUSION_MODEL
    if "transformers.PreTrainedModel" in names:
        can_generate = getattr(type(obj), "can_generate", None)
        return ModelKind.CAUSAL_LM if callable(can_generate) and obj.can_generate() else ModelKind.TRANSFORMERS
    return ModelKind.MODULE


@dataclasses.dataclass
class Plugin:
    """Base class of every hf_accel plugin. Subclasses are dataclasses; their fields are the options."""

    name: ClassVar[str]
    family: ClassVar[Family]
    supported_kinds: ClassVar[frozenset[ModelKind]] = frozenset({ModelKind.CAUSAL_LM})
    # Plugin names, or "family:<family>" for a whole family, that cannot be applied together with this one.
    conflicts_with: ClassVar[tuple[str, ...]] = ()
    # True when apply() replaces weights by a new representation: the artifact stores the new form, the model must
    # be rebuilt by `prepare_for_loading` before those weights load, and remove() cannot restore the originals.
    rewrites_weights: ClassVar[bool] = False
    order: ClassVar[int | None] = None

    @classmethod
    def apply_order(cls) -> int:
        return cls.order if cls.order is not None else DEFAULT_ORDER[cls.family]

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def check(self, model: Any) -> None:
        """Raise UnsupportedModelError if this plugin cannot work on `model`. Called before any change is made."""
        kind = model_kind(model)
        if kind not in self.supported_kinds:
            accepted = ", ".join(sorted(k.value for k in self.supported_kinds))
            raise UnsupportedModelError(
                f"plugin {self.name!r} does not support {type(model).__name__} (a {kind.value} model); "
                f"it accepts: {accepted}"
            )

    def apply(self, model: Any, patcher: "Patcher") -> None:
        raise NotImplementedError

    def prepare_for_loading(self, model: Any, patcher: "Patcher") -> None:
        """For plugins that rewrite weights: turn the freshly built skeleton (often on the meta device) into the
        rewritten structure so that the saved, already-rewritten weights load into it."""
        raise NotImplementedError(f"plugin {self.name!r} rewrites weights but cannot rebuild them for loading")

    def card_metadata(self, model: Any) -> dict[str, Any]:
        """Facts for the model card (e.g. bytes saved); measured metrics come from benchmarks and the harness."""
        return {}
