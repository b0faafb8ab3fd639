"""Attention for the fast runtime: masks built from device-side slot indices, and SDPA that never repeats the cache.

transformers' SDPA path repeats K/V per query head under torch.compile (`repeat_kv`): with grouped-query attention
that copies the whole cache every step (4x for Llama-3). `fast_sdpa` instead folds the query heads of a group onto
their KV head ([B, Hq, Q, D] -> [B, Hkv, G*Q, D]), which is exact and reads the cache once. It is registered as
the attention implementation "hf_accel_sdpa" and used only inside the runtime's own forwards (`use_fast_attention`);
anything it is not made for (long queries: the prefill) goes to transformers' `sdpa_attention_forward`. A KV
layer may hand it, instead of K/V tensors, a view with `attend(query, mask, scale)` (its own attention over its own
storage, e.g. kvquant's codes read by a Triton kernel) and `materialize()` (the K/V tensors, for calls `attend`
does not serve); see contract point 2 in __init__.

Masks are always 4-D here (transformers then skips its own mask code) or None for an unpadded causal prefill, which
lets SDPA take its flash kernel.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

FAST_SDPA = "hf_accel_sdpa"
DECODE_ATTENTION = ("matmul", "sdpa")
# how `fast_sdpa` computes short (decode / verify) queries; set by `use_fast_attention` from the runtime's option.
# "sdpa": F.scaled_dot_product_attention, whose memory-efficient kernel parallelises over heads and query blocks
# only (batch 1 x 8 KV heads = 8 programs for a 4k cache). "matmul": two batched matmuls and a float32 softmax,
# which cuBLAS / inductor spread over the cache length.
_decode_attention = "matmul"


def fast_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    if not isinstance(key, torch.Tensor):  # a KV layer's decode view over its own storage (contract point 2)
        if attention_mask is not None and attention_mask.dim() == 4 and not dropout and kwargs.get("softcap") is None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return key.attend(query, attention_mask, scale), None
        key, value = key.materialize()
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    if attention_mask is None or attention_mask.dim() != 4 or q_len > 64 or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = hq // hkv
    q = query.reshape(b, hkv, groups * q_len, d)  # head h*G+g of the queries reads KV head h (as repeat_kv does)
    mask = attention_mask
    if groups > 1 and q_len > 1:
        mask = mask[:, :, None].expand(b, 1, groups, q_len, mask.shape[-1]).reshape(b, 1, groups * q_len, -1)
    if _decode_attention == "matmul" and query.is_cuda:  # CPU keeps SDPA: token-identical to transformers
        out = matmul_attention(q, key, value, mask, scaling)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, q_len, d).transpose(1, 2).contiguous(), None


def matmul_attention(q, key, value, mask, scaling=None):
    """softmax(q k^T * scale + mask) v for few queries, the softmax in float32. `mask` is additive (decode steps) or
    bool, True = attend (a short padded prefill: adding a bool mask would add 0/1 and mask nothing)."""
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)


AttentionInterface.register(FAST_SDPA, fast_sdpa)

# An attention implementation that wraps "sdpa" (e.g. the KV plugins' score hook "hf_accel_kv:sdpa") -> its variant
# that wraps `fast_sdpa` instead: the runtime swaps to it for its own forwards and treats both like "sdpa".
FAST_VARIANTS: dict[str, str] = {}


def register_fast_variant(impl: str, variant: str) -> None:
    """`variant` (registered in AttentionInterface, over `fast_sdpa`) replaces `impl` (over "sdpa") inside the
    runtime's forwards, so that a wrapper of SDPA keeps the runtime's mask kind, flash prefill and GQA folding."""
    FAST_VARIANTS[impl] = variant


def mask_kind(model) -> str | None:
    """"fast" (`fast_sdpa`: additive decode mask, bool prefill mask), "bool" (another SDPA-like function: the
    contract), "additive" (eager), None: unsupported."""
    impl = model.config._attn_implementation or "eager"
    if impl in ("sdpa", FAST_SDPA) or impl in FAST_VARIANTS or impl in FAST_VARIANTS.values():
        return "fast"
    if impl == "eager":
        return "additive"
    if "flash" in impl or impl in ("flex_attention", "paged_attention") or impl.startswith("paged"):
        return None  # these take 2-D or block masks, not the 4-D masks the runtime builds
    return "bool"  # an attention plugin's function: contract = bool 4-D mask, full-capacity K/V


@contextlib.contextmanager
def use_fast_attention(model, decode_attention: str = "matmul"):
    """Route SDPA attention through `fast_sdpa` for the duration of a runtime forward (or a capture)."""
    global _decode_attention
    config = model.config
    old, old_decode = config._attn_implementation, _decode_attention
    target = FAST_SDPA if old == "sdpa" else FAST_VARIANTS.get(old)
    swap = target is not None
    if swap:
        config._attn_implementation_internal = target
    _decode_attention = decode_attention
    try:
        yield
    finally:
        _decode_attention = old_decode
        if swap:
            config._attn_implementation_internal = old


def decode_mask(prompt_valid, prompt_len, slots, window: int | None, kind: str, dtype):
    """[B, 1, Q, C]: key j is visible to query q (in slot slots[q]) if it is a real prompt token, or generated and not
    after q; within `window` slots of q for sliding-window models. For `fast_sdpa` the mask is additive, built once
    per step: SDPA would otherwise convert a bool mask to a float bias again in every layer. `slots` is [Q] (all
    rows) or [B, Q] (a speculative session's per-row slots: a row's rejected drafts lie after its own queries)."""
    c = prompt_valid.shape[1]
    j = torch.arange(c, device=prompt_valid.device)
    q_slot = slots[..., None]  # [Q, 1] or [B, Q, 1]
    mask = prompt_valid[:, None, :] | ((j >= prompt_len) & (j <= q_slot))
    if window:
        mask = mask & (j > q_slot - window)
    return as_kind(mask[:, None], "additive" if kind == "fast" else kind, dtype)


def prefill_mask(valid, window: int | None, kind: str, dtype):
    """[B, 1, T, T] causal mask over the prompt (`valid` [B, T], False for left padding), or None when SDPA's own
    causal path is exact (no padding, no window inside the prompt). Each query also sees itself, so padded
    queries attend to something: their outputs are finite and their K/V can sit in masked cache slots."""
    t = valid.shape[1]
    if kind == "fast" and (not window or window >= t) and bool(valid.all()):
        return None
    i = torch.arange(t, device=valid.device)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed = allowed & (i[None, :] > i[:, None] - window)
    mask = (allowed[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return as_kind(mask[:, None], kind, dtype)


def as_kind(mask: torch.Tensor, kind: str, dtype):
    """Bool masks stay bool (True = attend); eager attention adds its mask, so it gets 0 / dtype-min."""
    if kind != "additive":
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)
