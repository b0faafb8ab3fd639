"""Adaptive first-block caching with calibrated error correction.

Decision (First Block Cache, ParaAttention; TeaCache, Liu et al. arXiv:2411.19108): every step runs a cheap head
of the model and compares its signal with the signal at the last fully computed step by relative L1,
`mean|s - s_ref| / mean|s_ref|`. Below `threshold`, the rest of the model is not run and its contribution from the
last computed step is reused; otherwise everything runs and the references are refreshed. Because the reference is
the last *computed* step, the drift of consecutive reused steps accumulates against the threshold.

* transformers (DiT, PixArt, Flux, ...): the head is the first transformer block, the signal its residual; reuse adds
  the kept residual of all remaining blocks (image and text stream) to the head's output; the other blocks pass
  their input through.
* UNets: the head is the shallow down path of DeepCache's split (`depth`, see `_hooks.UNetSplit`), the signal the
  input of the deep branch; reuse replays the deep branch, so only the shallow path runs.

Error correction (ERTACache-style; Gao et al., "ERTACache: Error Rectification and Timesteps Adjustment for Efficient
Diffusion", github.com/bytedance/ERTACache). ERTACache profiles offline how cached residuals deviate from the true
ones and rectifies reused features with a closed-form (linearised) error model. What is implemented here is the
rectification part in its simplest form: from the uncached calibration trajectory, for every timestep t_s a scalar
linear model of the reused quantity Q (tail residual / deep-branch output) between consecutive steps is fitted by
least squares, `Q_s ~= a_s * Q_{s-1} + b_s` (closed form: a_s = cov/var, b_s = mean difference). A reused step s
then uses `a_s * Q_hat_{s-1} + b_s` chained from the last computed Q instead of the stale Q. The coefficients are
options (`cal_timesteps`, `cal_scale`, `cal_offset`), so they save with the artifact; timesteps that were not
calibrated use (1, 0), i.e. plain reuse. ERTACache's timestep adjustment and offline step schedule are not
implemented. `diffusion_calibrate` (calibrate.py) fits them and picks the threshold. Measured on the digits
reference (50 DDIM steps, 40 images, same 17/50 computed steps): 31.91 dB with the correction, 32.09 dB without
(benchmarks/results/bench_diffusers.json), so it is off by default (`correction=True` turns it on).

    hf_accel.apply(pipe, "fbcache(threshold=0.08)")
    from hf_accel.plugins.diffusion_cache import diffusion_calibrate
    diffusion_calibrate(pipe, target_psnr=30, call_kwargs={"prompt": prompts}, steps=50)
"""

from __future__ import annotations

import bisect
import dataclasses

import torch

from hf_accel.errors import UnsupportedModelError
from hf_accel.patching import Patcher
from hf_accel.plugin import Family, ModelKind, Plugin

from . import _hooks as H

HOOK_DENOISER = H.HOOK_PREFIX + "fbcache"
HOOK_HEAD = H.HOOK_PREFIX + "fbcache_head"
HOOK_BLOCK = H.HOOK_PREFIX + "fbcache_block"


class _Decider:
    """The decision and the correction, shared by the transformer and the UNet variant."""

    def __init__(self, plugin: "FirstBlockCache", controller: H.Controller):
        self.plugin, self.controller = plugin, controller

    @torch.compiler.disable
    def decide(self, state: H.CacheState, signal: torch.Tensor) -> bool:
        """True: reuse for the rest of this call. Keeps the reference signal of computed steps."""
        p = self.plugin
        reuse = False
        if (state.ref is not None and state.ref.shape == signal.shape and state.step >= p.warmup
                and (p.max_skip <= 0 or state.skipped_in_row < p.max_skip) and state.estimate is not None):
            diff = H.rel_l1(signal, state.ref)
            self.controller.stats.diffs.append((state.step, diff))
            reuse = diff < p.threshold
        if reuse:
            state.replay = True
            if p.correction:
                a, b = p.coefficients(state.last_t)
                if a != 1.0 or b != 0.0:
                    state.estimate = H.map_first(state.estimate, lambda q: q * a + b) \
                        if not isinstance(state.estimate, list) else [state.estimate[0] * a + b] + state.estimate[1:]
        else:
            state.ref = signal.detach()
        return reuse


class HeadBlockHook(H.ModelHook):
    """First transformer block: always runs; decides; on reuse returns head output + (corrected) tail residual."""

    def __init__(self, decider: _Decider, io: H.BlockIO):
        super().__init__()
        self.decider, self.io = decider, io

    def new_forward(self, module, *args, **kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        state = self.decider.controller.current
        if state is None:
            return out
        hid_in = self.io.arg("hidden_states", args, kwargs)
        hid, enc = self.io.split(out)
        if self.decider.decide(state, hid - hid_in):
            r_hid, r_enc = state.estimate
            n_out = len(out) if isinstance(out, tuple) else None
            return self.io.join(hid + r_hid, enc if enc is None or r_enc is None else enc + r_enc, n_out)
        state.store["head"] = (hid, enc)
        return out


class TailBlockHook(H.ModelHook):
    """Remaining blocks: pass the input through on reuse; the last one keeps the tail residual when computing."""

    def __init__(self, controller: H.Controller, io: H.BlockIO, last: bool):
        super().__init__()
        self.controller, self.io, self.last = controller, io, last
        self._n_out: int | None = None  # the block's output arity, learnt from its computed calls

    def new_forward(self, module, *args, **kwargs):
        state = self.controller.current
        if state is not None and state.replay:
            hid = self.io.arg("hidden_states", args, kwargs)
            enc = self.io.arg("encoder_hidden_states", args, kwargs) if self.io.out_encoder is not None else None
            return self.io.join(hid, enc, self._n_out)
        out = self.fn_ref.original_forward(*args, **kwargs)
        self._n_out = len(out) if isinstance(out, tuple) else None
        if state is not None and self.last and "head" in state.store:
            hid, enc = self.io.split(out)
            h_hid, h_enc = state.store["head"]
            state.estimate = [hid - h_hid, None if enc is None or h_enc is None else enc - h_enc]
            if self.controller.trace is not None:
                self.controller.trace.append((self.controller.key_of(state), state.step, state.last_t,
                                              state.estimate[0].detach()))
        return out


class ProbeHook(H.ModelHook):
    """UNet: the last unit of the shallow down path; its output is the deep branch's input and the signal."""

    def __init__(self, decider: _Decider):
        super().__init__()
        self.decider = decider

    def new_forward(self, module, *args, **kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        state = self.decider.controller.current
        if state is not None:
            self.decider.decide(state, H.first_tensor(out))
        return out


@dataclasses.dataclass
class FirstBlockCache(Plugin):
    """Adaptive first-block residual cache with calibrated (ERTACache-style) correction; UNets and transformers."""

    name = "fbcache"
    family = Family.DIFFUSION_CACHE
    supported_kinds = frozenset({ModelKind.DIFFUSION_PIPELINE, ModelKind.DIFFUSION_MODEL})
    conflicts_with = ("family:diffusion_cache",)

    threshold: float = 0.08  # relative L1 change of the head signal below which the rest is reused (0 = never)
    depth: int = 1  # UNets: skip connections in the always-computed shallow path (see deepcache)
    warmup: int = 1  # the first `warmup` steps of a generation always run in full
    max_skip: int = 0  # at most this many reused steps in a row (0 = no limit)
    correction: bool = False  # apply the calibrated linear correction of reused features (opt-in, see above)
    cal_timesteps: tuple[float, ...] = ()  # written by diffusion_calibrate: timesteps, ...
    cal_scale: tuple[float, ...] = ()  # ... and per timestep the scale a_s ...
    cal_offset: tuple[float, ...] = ()  # ... and offset b_s of the reused quantity

    def __post_init__(self):
        if self.threshold < 0 or self.warmup < 0 or self.depth < 0:
            raise ValueError("threshold, warmup and depth must be >= 0")
        if not len(self.cal_timesteps) == len(self.cal_scale) == len(self.cal_offset):
            raise ValueError("cal_timesteps, cal_scale and cal_offset must have the same length")

    def coefficients(self, t: float | None) -> tuple[float, float]:
        """(a, b) calibrated for timestep t, or (1, 0)."""
        if t is None or not self.cal_timesteps:
            return 1.0, 0.0
        ts = self.cal_timesteps
        order = sorted(range(len(ts)), key=ts.__getitem__)
        keys = [ts[i] for i in order]
        j = bisect.bisect_left(keys, t)
        for k in (j - 1, j):
            if 0 <= k < len(keys) and abs(keys[k] - t) <= 1e-4 * max(1.0, abs(t)):
                return self.cal_scale[order[k]], self.cal_offset[order[k]]
        return 1.0, 0.0

    def check(self, model) -> None:
        super().check(model)
        den = H.denoiser_of(model)
        if H.is_unet(den):
            H.split_unet(den, self.depth)
        elif len(H.transformer_blocks(den)) < 2:
            raise UnsupportedModelError(
                f"fbcache needs a UNet or a transformer with at least 2 transformer blocks; {type(den).__name__} "
                "has neither"
            )

    def apply(self, model, patcher: Patcher) -> None:
        den = H.denoiser_of(model)
        ctl = H.Controller()
        decider = _Decider(self, ctl)
        veto = ("down_intrablock_additional_residuals",)
        H.register(patcher, den, H.DenoiserHook(ctl, lambda state: None, H.forward_params(den), veto),
                   HOOK_DENOISER, "fbcache step clock")
        if H.is_unet(den):
            split = H.split_unet(den, self.depth)
            H.register(patcher, split.probe[1], ProbeHook(decider), HOOK_HEAD, f"fbcache probe {split.probe[0]}")
            for name, module in split.deep:
                H.register(patcher, module, H.ReplayHook(ctl, name, boundary=name == split.boundary), HOOK_BLOCK,
                           f"fbcache reuse of {name}")
        else:
            blocks = H.transformer_blocks(den)
            H.register(patcher, blocks[0][1], HeadBlockHook(decider, H.BlockIO.of(blocks[0][1])), HOOK_HEAD,
                       f"fbcache head {blocks[0][0]}")
            for i, (name, block) in enumerate(blocks[1:], 1):
                H.register(patcher, block, TailBlockHook(ctl, H.BlockIO.of(block), last=i == len(blocks) - 1),
                           HOOK_BLOCK, f"fbcache reuse of {name}")
        H.invalidate(den, patcher)
