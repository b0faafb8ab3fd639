"""Diffusion caches: skip work between denoising steps, as removable diffusers hooks.

| plugin | models | what is reused |
| --- | --- | --- |
| `deepcache` | UNet2DConditionModel, UNet2DModel | deep-branch features every N steps (DeepCache, arXiv:2312.00858) |
| `fora` | diffusers transformers (DiT, PixArt, Flux, SD3...) | every block's residual every N steps (FORA, arXiv:2407.01425) |
| `fbcache` | both | everything after the first block when its signal barely changed (First Block Cache / TeaCache), with a calibrated ERTACache-style correction; `diffusion_calibrate` picks the threshold |

How steps and generations are detected, CFG, custom loops and torch.compile: see `_hooks`.
"""

from ._hooks import cache_stats, reset_cache
from .calibrate import CalibrationResult, diffusion_calibrate
from .deepcache import DeepCache
from .fbcache import FirstBlockCache
from .fora import Fora

__all__ = ["CalibrationResult", "DeepCache", "FirstBlockCache", "Fora", "cache_stats", "diffusion_calibrate",
           "reset_cache"]
