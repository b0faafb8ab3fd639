"""Diffusion caches: skip work between denoising steps, as removable diffusers hooks.

| plugin | models | what is reused |
| --- | --- | --- |
| `deepcache` | UNet2DConditionModel, UNet2DModel | deep-branch features every N steps (DeepCache, arXiv:2312.00858) |
| `fora` | diffusers transformers (DiT, PixArt, Flux, SD3...) | every block's residual every N steps (FORA, arXiv:2407.01425) |
| `fbcache` | both | everything after the first block when its signal barely changed (First Block Cache / TeaCache), with a calibrated ERTACache-style correction; `diffusion_calibrate` picks the threshold |

| `tome` | UNets with transformer blocks (SD1.5, SDXL) | nothing: merges similar tokens before self-attention (ToMe for SD, arXiv:2303.17604) |

Quantization for the same denoisers is `w8a8` (plugins/quantization/w8a8_diffusion.py); `diffusion_calibrate(pipe,
target_psnr=..., accel="w8a8")` calibrates fbcache on the quantized denoiser against the plain pipeline (CacheQuant).

How steps and generations are detected, CFG, custom loops and torch.compile: see `_hooks`. Order with
torch.compile: apply every plugin first (`accel=` does), then compile the blocks in place
(`for b in unet/transformer blocks: b.compile()`); w8a8's matmul is one opaque op, ToMe's index computation is
excluded from the graph, the caches' step clock stays in eager Python on the denoiser.
"""

from ._hooks import cache_stats, reset_cache
from .calibrate import CalibrationResult, diffusion_calibrate
from .deepcache import DeepCache
from .fbcache import FirstBlockCache
from .fora import Fora
from .tome import TokenMerging

__all__ = ["CalibrationResult", "DeepCache", "FirstBlockCache", "Fora", "TokenMerging", "cache_stats", "diffusion_calibrate",
           "reset_cache"]
