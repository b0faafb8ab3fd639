"""ToMe for Stable Diffusion: merge redundant tokens before a UNet's self-attention, unmerge after (Bolya & Hoffman,
"Token Merging for Fast Stable Diffusion", arXiv:2303.17604; the tomesd recipe).

In every `BasicTransformerBlock` of the UNet whose resolution is at most `max_downsample` times below the latent's
(1 = only the highest-resolution blocks, where attention costs most), the tokens entering `attn1` are split into
destinations (one random token per `stride` x `stride` cell) and sources; the `ratio` of all tokens that are most
similar (cosine) to a destination are averaged into it (bipartite soft matching), attention runs on the rest, and
each merged token gets its destination's output back. Self-attention on N(1-r) tokens costs ~(1-r)^2 of the
quadratic part. Cross-attention and the MLP are left alone (tomesd's defaults).

The destination choice is random per call (tomesd's `use_rand`), from a generator seeded with `seed`, the timestep
and the block, so runs repeat exactly; `random=false` picks the top-left token of every cell.

A removable diffusers hook on each `attn1` plus one on the UNet that records the latent's height and width; works
with custom loops and CFG batches (merging is per sample). torch.compile: apply first, then compile the blocks
(the index computation is excluded from the graph).

    hf_accel.apply(pipe, "tome(ratio=0.5)")
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from hf_accel.errors import UnsupportedModelError
from hf_accel.patching import Patcher
from hf_accel.plugin import Family, ModelKind, Plugin

from . import _hooks as H

HOOK_UNET = H.HOOK_PREFIX + "tome_size"
HOOK_ATTN = H.HOOK_PREFIX + "tome_attn"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.compiler.disable
def _partition(h: int, w: int, sy: int, sx: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Token indices (h*w,), destinations first: one per sy x sx cell (random or top-left), then the sources."""
    hsy, wsx = h // sy, w // sx
    if generator is not None:
        pick = torch.randint(sy * sx, (hsy, wsx, 1), generator=generator)
    else:
        pick = torch.zeros(hsy, wsx, 1, dtype=torch.int64)
    buf = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64)
    buf.scatter_(2, pick, -1)  # -1 marks the destination of each cell
    buf = buf.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    if hsy * sy < h or wsx * sx < w:  # the rim that no full cell covers holds sources only
        full = torch.zeros(h, w, dtype=torch.int64)
        full[: hsy * sy, : wsx * sx] = buf
        buf = full
    return buf.reshape(-1).argsort(stable=True).to(device)  # -1s (destinations) sort first


def bipartite_merge(metric: torch.Tensor, h: int, w: int, stride: int, r: int,
                    generator: torch.Generator | None) -> tuple[Callable, Callable]:
    """(merge, unmerge) for tokens (B, N=h*w, C): merge removes `r` tokens per sample by averaging each of the `r`
    sources most similar to a destination into it; unmerge copies outputs back to the full N tokens."""
    b, n, _ = metric.shape
    sy = sx = stride
    if r <= 0 or h < sy or w < sx:
        return _identity, _identity
    order = _partition(h, w, sy, sx, generator, metric.device)
    num_dst = (h // sy) * (w // sx)
    dst_idx_all, src_idx_all = order[:num_dst], order[num_dst:]
    r = min(r, src_idx_all.numel())
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, d = m[:, src_idx_all], m[:, dst_idx_all]
        scores = a @ d.transpose(-1, -2)  # (B, n_src, n_dst)
        best, best_dst = scores.max(dim=-1)
        edge = best.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge[:, r:], edge[:, :r]  # positions within the sources
        dst_idx = best_dst[..., None].gather(1, src_idx)  # positions within the destinations

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_idx_all], x[:, dst_idx_all]
        unm = src.gather(1, unm_idx.expand(-1, -1, c))
        moved = src.gather(1, src_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), moved, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        n_unm = unm_idx.shape[1]
        unm, dst = x[:, :n_unm], x[:, n_unm:]
        moved = dst.gather(1, dst_idx.expand(-1, -1, c))
        out = x.new_zeros(x.shape[0], n, c)
        out[:, dst_idx_all] = dst
        src_full = x.new_zeros(x.shape[0], src_idx_all.numel(), c)
        src_full.scatter_(1, unm_idx.expand(-1, -1, c), unm)
        src_full.scatter_(1, src_idx.expand(-1, -1, c), moved)
        out[:, src_idx_all] = src_full
        return out

    return merge, unmerge


class _Size:
    """The latent height and width of the current UNet call, and a call counter for the random partition."""

    def __init__(self) -> None:
        self.hw: tuple[int, int] | None = None
        self.t = 0  # the call's timestep (x1000, rounded): seeds the random partition, so runs repeat exactly


class SizeHook(H.ModelHook):
    def __init__(self, size: _Size, params: list[str]):
        super().__init__()
        self.size, self.params = size, params

    def pre_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs.get(self.params[0]) if self.params else None
        self.size.hw = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None
        t = kwargs.get("timestep")
        if t is None and "timestep" in self.params and self.params.index("timestep") < len(args):
            t = args[self.params.index("timestep")]
        t = H.timestep_value(t)
        self.size.t = 0 if t is None else int(round(t * 1000))
        return args, kwargs

    def post_forward(self, module, output):
        self.size.hw = None
        return output


class MergeAttentionHook(H.ModelHook):
    """On `attn1`: merge the tokens, attend, unmerge."""

    def __init__(self, plugin: "TokenMerging", size: _Size, index: int):
        super().__init__()
        self.plugin, self.size, self.index = plugin, size, index

    def new_forward(self, module, hidden_states, *args, **kwargs):
        p, hw = self.plugin, self.size.hw
        extra = args or kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None
        if hw is None or hidden_states.dim() != 3 or extra:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        n = hidden_states.shape[1]
        down = math.sqrt(hw[0] * hw[1] / n)
        level = int(round(down))
        if level > p.max_downsample or level < 1:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        h, w = math.ceil(hw[0] / level), math.ceil(hw[1] / level)
        if h * w != n:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        gen = None
        if p.random:
            gen = torch.Generator().manual_seed((p.seed * 1_000_003 + self.size.t * 1009 + self.index) % (2 ** 63))
        merge, unmerge = bipartite_merge(hidden_states, h, w, p.stride, int(n * p.ratio), gen)
        out = self.fn_ref.original_forward(merge(hidden_states), *args, **kwargs)
        return unmerge(out)


def _self_attentions(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, module in unet.named_modules():
        if type(module).__name__ == "BasicTransformerBlock" and getattr(module, "attn1", None) is not None \
                and not getattr(module.attn1, "is_cross_attention", False):
            out.append((f"{name}.attn1", module.attn1))
    return out


@dataclasses.dataclass
class TokenMerging(Plugin):
    """ToMe for SD: merge similar tokens before a UNet's self-attention and unmerge after (arXiv:2303.17604)."""

    name = "tome"
    family = Family.ATTENTION
    supported_kinds = frozenset({ModelKind.DIFFUSION_PIPELINE, ModelKind.DIFFUSION_MODEL})

    ratio: float = 0.5  # fraction of the tokens merged away (tomesd: up to 0.6 keeps SD images close)
    max_downsample: int = 1  # merge in blocks at most this many times below the latent resolution (1, 2, 4, 8)
    stride: int = 2  # one destination per stride x stride cell
    random: bool = True  # random destination per cell (seeded per call), else the top-left token
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8) or self.stride < 1:
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8 and stride >= 1, got {self.max_downsample}, "
                             f"{self.stride}")

    def check(self, model: Any) -> None:
        super().check(model)
        den = H.denoiser_of(model)
        if not H.is_unet(den) or not _self_attentions(den):
            raise UnsupportedModelError(
                f"tome needs a UNet with transformer blocks (BasicTransformerBlock self-attention, e.g. SD1.5/SDXL); "
                f"{type(den).__name__} has none"
            )

    def apply(self, model, patcher: Patcher) -> None:
        unet = H.denoiser_of(model)
        size = _Size()
        H.register(patcher, unet, SizeHook(size, H.forward_params(unet)), HOOK_UNET, "tome latent size")
        for i, (name, attn) in enumerate(_self_attentions(unet)):
            H.register(patcher, attn, MergeAttentionHook(self, size, i), HOOK_ATTN, f"tome merge around {name}")
        H.invalidate(unet, patcher)

    def card_metadata(self, model):
        return {"tome_attentions": len(_self_attentions(H.denoiser_of(model)))}
