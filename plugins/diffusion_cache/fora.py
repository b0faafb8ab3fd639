"""FORA: static reuse of each transformer block's residual (Selvaraju et al., "FORA: Fast-Forward Caching in
Diffusion Transformer Acceleration", arXiv:2407.01425).

Every `interval` steps all blocks run and each block's residual (output minus input, for the image stream and, in
dual-stream blocks such as Flux's, the text stream) is kept; on the steps in between each block returns its current
input plus the kept residual, so only the embeddings, the first `warmup` steps and the final norm/projection run.
FORA caches the attention and MLP outputs of each layer; since a DiT block is `x + attn(...) + mlp(...)`, reusing
the block residual is the same reuse at block granularity.

    hf_accel.apply(pipe, "fora(interval=3)")   # DiT, PixArt, Flux, SD3, ... (any diffusers transformer)
"""

from __future__ import annotations

import dataclasses

from hf_accel.errors import UnsupportedModelError
from hf_accel.patching import Patcher
from hf_accel.plugin import Family, ModelKind, Plugin

from . import _hooks as H

HOOK_DENOISER = H.HOOK_PREFIX + "fora"
HOOK_BLOCK = H.HOOK_PREFIX + "fora_block"


class ResidualReuseHook(H.ModelHook):
    def __init__(self, controller: H.Controller, name: str, io: H.BlockIO):
        super().__init__()
        self.controller, self.name, self.io = controller, name, io

    def new_forward(self, module, *args, **kwargs):
        state = self.controller.current
        hid = self.io.arg("hidden_states", args, kwargs)
        enc = self.io.arg("encoder_hidden_states", args, kwargs) if self.io.out_encoder is not None else None
        if state is not None and state.replay:
            r_hid, r_enc, n_out = state.store[self.name]
            return self.io.join(hid + r_hid, None if enc is None else enc + r_enc, n_out)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if state is not None:
            o_hid, o_enc = self.io.split(out)
            state.store[self.name] = (o_hid - hid, None if enc is None or o_enc is None else o_enc - enc,
                                      len(out) if isinstance(out, tuple) else None)
        return out


@dataclasses.dataclass
class Fora(Plugin):
    """Static every-N reuse of transformer block residuals (FORA, arXiv:2407.01425)."""

    name = "fora"
    family = Family.DIFFUSION_CACHE
    supported_kinds = frozenset({ModelKind.DIFFUSION_PIPELINE, ModelKind.DIFFUSION_MODEL})
    conflicts_with = ("family:diffusion_cache",)

    interval: int = 3  # all blocks run every `interval` steps (1 = never reuse)
    warmup: int = 0  # the first `warmup` steps of a generation always run in full

    def __post_init__(self):
        if self.interval < 1 or self.warmup < 0:
            raise ValueError(f"interval must be >= 1 and warmup >= 0, got {self.interval}, {self.warmup}")

    def check(self, model) -> None:
        super().check(model)
        den = H.denoiser_of(model)
        if not H.transformer_blocks(den):
            hint = " (a UNet: use deepcache or fbcache)" if H.is_unet(den) else ""
            raise UnsupportedModelError(f"fora needs a transformer denoiser with transformer blocks; "
                                        f"{type(den).__name__} has none{hint}")

    def policy(self, state: H.CacheState) -> None:
        step = state.step
        state.replay = step >= self.warmup and (step - self.warmup) % self.interval != 0 and bool(state.store)

    def apply(self, model, patcher: Patcher) -> None:
        den = H.denoiser_of(model)
        ctl = H.Controller()
        H.register(patcher, den, H.DenoiserHook(ctl, self.policy, H.forward_params(den)), HOOK_DENOISER,
                   "fora step clock")
        for name, block in H.transformer_blocks(den):
            H.register(patcher, block, ResidualReuseHook(ctl, name, H.BlockIO.of(block)), HOOK_BLOCK,
                       f"fora reuse of {name}")
        H.invalidate(den, patcher)
