"""DeepCache: reuse a UNet's deep features between full steps (Ma et al., "DeepCache: Accelerating Diffusion Models
for Free", arXiv:2312.00858).

Adjacent denoising steps produce nearly the same high-level features. Every `interval` steps the whole UNet runs and
the outputs of its deep branch are kept; on the steps in between only the shallow path runs (conv_in, the first
`depth` down units, the last up layers, conv_out) and the deep branch hands back what it computed last time. See
`_hooks.UNetSplit` for exactly which units are shallow; `depth=0` keeps only conv_in and the last up layer fresh
(fastest), larger depths keep more of the high-resolution layers fresh (closer to the uncached output).

    hf_accel.apply(pipe, "deepcache(interval=3, depth=1)")   # a UNet pipeline, or the UNet itself
"""

from __future__ import annotations

import dataclasses

from hf_accel.patching import Patcher
from hf_accel.plugin import Family, ModelKind, Plugin

from . import _hooks as H

HOOK_DENOISER = H.HOOK_PREFIX + "deepcache"
HOOK_UNIT = H.HOOK_PREFIX + "deepcache_unit"


@dataclasses.dataclass
class DeepCache(Plugin):
    """UNet deep-feature reuse every N steps (DeepCache, arXiv:2312.00858)."""

    name = "deepcache"
    family = Family.DIFFUSION_CACHE
    supported_kinds = frozenset({ModelKind.DIFFUSION_PIPELINE, ModelKind.DIFFUSION_MODEL})
    conflicts_with = ("family:diffusion_cache",)

    interval: int = 3  # a full UNet pass every `interval` steps (1 = never reuse)
    depth: int = 1  # skip connections of the shallow path that are recomputed every step (0 = conv_in only)
    warmup: int = 0  # the first `warmup` steps of a generation always run in full

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.depth < 0 or self.warmup < 0:
            raise ValueError("depth and warmup must be >= 0")

    def check(self, model) -> None:
        super().check(model)
        H.split_unet(H.denoiser_of(model), self.depth)  # raises UnsupportedModelError with the reason

    def policy(self, state: H.CacheState) -> None:
        step = state.step
        state.replay = step >= self.warmup and (step - self.warmup) % self.interval != 0 and bool(state.store)

    def apply(self, model, patcher: Patcher) -> None:
        unet = H.denoiser_of(model)
        split = H.split_unet(unet, self.depth)
        ctl = H.Controller()
        veto = ("down_intrablock_additional_residuals",)  # T2I-Adapter adds these in place to down outputs
        H.register(patcher, unet, H.DenoiserHook(ctl, self.policy, H.forward_params(unet), veto), HOOK_DENOISER,
                   "deepcache step clock")
        for name, module in split.deep:
            H.register(patcher, module, H.ReplayHook(ctl, name), HOOK_UNIT, f"deepcache reuse of {name}")
        H.invalidate(unet, patcher)

    def card_metadata(self, model):
        split = H.split_unet(H.denoiser_of(model), self.depth)
        return {"deep_units": len(split.deep), "shallow_units": split.shallow}
