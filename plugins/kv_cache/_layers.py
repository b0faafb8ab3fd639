"""Cache plumbing shared by every KV plugin: one transformers cache layer that evicts, quantizes, or both.

Storage of one layer, per batch row and KV head (`n` slots, ordered by position):

    [ quantized slots (kvquant only) | full-precision slots ]        pos: [B, H, n] int32, -1 = padding

Without kvquant every slot is full precision. With kvquant, new tokens land in the full-precision part and all but
the `residual` most recent are quantized after the step (KIVI's full-precision recent window).

The evicting-cache contract (docs: hf_integration.md §2.3), as `DynamicSlidingWindowLayer` follows it:
`get_seq_length()` = tokens seen, `get_mask_sizes(q)` = (stored + q, seen - stored), and `update()` returns
stored + new with eviction applied afterwards (in `update` for policies that need no attention, in the attention
hook, after the step's scores, for those that do). Every layer of a cache holds the same number of slots, because
transformers builds one mask for all layers.

Padding. transformers looks the 2-D attention mask up at absolute positions `[seen - stored, seen)`. A row keeps
`min(real tokens, width)` real tokens, ordered by position, after its padding slots; since a left-padded row's real
tokens are exactly its last ones, the slots line up with the mask: its zeros fall on the kept padding slots, its
ones on the kept real tokens. Padding is always evicted first, so a row keeps padding only when it has fewer real
tokens than the cache's width. This needs masks of the form 0..0 1..1 per row, checked when the mask arrives.
"""

from __future__ import annotations

import contextvars
import math
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer

from hf_accel.errors import AccelError, UnsupportedModelError

if TYPE_CHECKING:
    from .kvquant import KVQuant

QUANT_CHUNK = 2048  # tokens quantized at once (bounds the float32 temporaries of a long prefill)
FLUSH_EVERY = 32  # kvquant quantizes full-precision tokens in chunks: the window holds residual .. residual + 31

# The layer whose `update` ran last in this thread and waits for its attention scores (see `observe`).
PENDING: contextvars.ContextVar["KVLayer | None"] = contextvars.ContextVar("hf_accel_kv_pending", default=None)
# A layer that computes this step's attention itself (`layer.attend(...)`, called by the attention hook): head-split
# storage (duo) and page selection (quest), whose K/V the transformers attention functions cannot read as one tensor.
SELF_ATTEND: contextvars.ContextVar = contextvars.ContextVar("hf_accel_kv_self_attend", default=None)


# -- quantization (per-token codes; keys first normalised per channel) ------------------------------------------------

def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token quantization of x [..., n, D] in groups of `group` channels.

    Returns codes uint8 [..., n, D * bits / 8] (int4 / int2: 8 / bits consecutive channels per byte, the first in
    the low bits), scale and minimum [..., n, D / group]."""
    *lead, n, d = x.shape
    xg = x.float().reshape(*lead, n, d // group, group)
    lo, hi = xg.amin(-1), xg.amax(-1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    q = torch.round((xg - lo[..., None]) / scale[..., None]).clamp_(0, levels).to(torch.uint8).reshape(*lead, n, d)
    per = 8 // bits
    if per > 1:
        packed = q[..., 0::per]
        for i in range(1, per):
            packed = packed | (q[..., i::per] << (bits * i))
        q = packed
    return q, scale.to(x.dtype), lo.to(x.dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    if per > 1:
        codes = torch.stack([(codes >> (bits * i)) & mask for i in range(per)], dim=-1).flatten(-2)
    *lead, n, d = codes.shape
    x = codes.to(scale.dtype).reshape(*lead, n, d // group, group) * scale[..., None] + lo[..., None]
    return x.reshape(*lead, n, d)


class QuantStore:
    """Quantized K/V slots. Keys are divided by a per-channel scale fixed at the first flush (the channel outliers
    that KIVI quantizes per channel for) and then, like values, quantized per token, so every slot owns its scales
    and eviction is a plain gather."""

    def __init__(self, bits: int, group: int):
        self.bits, self.group = bits, group
        self.tensors: dict[str, torch.Tensor] = {}
        self.channel: torch.Tensor | None = None  # [B, H, 1, D]
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.channel is None:
            self.channel = k.float().abs().amax(dim=-2, keepdim=True).clamp(min=1e-4).to(k.dtype)
        parts = []  # a long prompt is quantized in chunks: float32 temporaries stay small
        for i in range(0, k.shape[-2], QUANT_CHUNK):
            kc, ks, kz = quantize(k[..., i:i + QUANT_CHUNK, :] / self.channel, self.bits, self.group)
            vc, vs, vz = quantize(v[..., i:i + QUANT_CHUNK, :], self.bits, self.group)
            parts.append(dict(kc=kc, ks=ks, kz=kz, vc=vc, vs=vs, vz=vz))
        new = parts[0] if len(parts) == 1 else {n: torch.cat([p[n] for p in parts], dim=-2) for n in parts[0]}
        self.tensors = new if not self.length else {n: torch.cat([self.tensors[n], t], dim=-2) for n, t in new.items()}
        self.length += k.shape[-2]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tensors
        k = dequantize(t["kc"], t["ks"], t["kz"], self.bits, self.group) * self.channel
        return k, dequantize(t["vc"], t["vs"], t["vz"], self.bits, self.group)

    def gather(self, idx: torch.Tensor) -> None:
        self.tensors = {n: _gather(t, idx) for n, t in self.tensors.items()}
        self.length = idx.shape[-1]

    def batch_select(self, index: torch.Tensor) -> None:
        self.tensors = {n: t[index] for n, t in self.tensors.items()}
        if self.channel is not None:
            self.channel = self.channel[index]

    def nbytes(self) -> int:
        extra = self.channel.nbytes if self.channel is not None else 0
        return sum(t.nbytes for t in self.tensors.values()) + extra


def rank_key(score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """int64 keys that order slots by score (higher first), ties by position (earlier first): the one total order
    every eviction picks its kept tokens by (`top_slots`, and `_fast_evict`'s prefill selection and h2o's decode
    eviction, whose storage is not in position order).

    `topk` alone breaks exact ties (SnapKV's max pooling makes them by construction: neighbouring slots share a
    window maximum) by storage index, and not even consistently, so a row's kept tokens changed when the batch got one
    more left-padding column. Positions shift by the same amount for every real token of a row, so an order by
    position is the same whatever the padding. The key is the float's bits mapped to a monotone int32 (sign bit
    kept, the other bits flipped for negatives; -0.0 folded into 0.0), times 2**32, plus 2**31 - 1 - pos: distinct
    for distinct positions (pos >= -2: padding -1, `_fast_evict.EMPTY`). Plain device arithmetic: no host sync,
    static shapes (capturable, compiles with the decode step)."""
    bits = (score.float() + 0.0).view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.long() * (1 << 32) + ((1 << 31) - 1 - pos.long())


def top_slots(score: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k] indices of the k best slots along the last dim by `rank_key` (score, then earlier position)."""
    return rank_key(score, pos).topk(k, dim=-1).indices


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, H, n, *] at slots idx [B, H, k] -> [B, H, k, *]."""
    if t.dim() == 3:
        return t.gather(2, idx)
    return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))


# -- the layer -------------------------------------------------------------------------------------------------------

class KVLayer(DynamicLayer):
    """One decoder layer's cache: `self.keys`/`self.values` hold the full-precision slots (DynamicLayer's fields),
    `self.quant` the quantized ones that precede them."""

    is_croppable = False  # assisted decoding crops the cache; evicted tokens cannot be restored

    def __init__(self, cache: "KVCache", layer_idx: int, policy, quant: "KVQuant | None"):
        super().__init__()
        self.cache, self.layer_idx, self.policy, self.quant_config = cache, layer_idx, policy, quant
        self.quant = QuantStore(quant.bits, quant.group) if quant is not None else None
        self.seen = 0
        self.cumulative_length = 0  # name transformers' reset() knows
        self.pos: torch.Tensor | None = None  # [B, H, n] int32 absolute positions, -1 for padding
        self.acc: torch.Tensor | None = None  # [B, H, n] float32, a policy's accumulated score (H2O)
        self.pending = False

    # -- the contract ------------------------------------------------------------------------------------------------
    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def stored(self) -> int:
        n = 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]
        return n + (self.quant.length if self.quant is not None else 0)

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers passed cache_position
            query_length = query_length.shape[0]
        s = self.stored()
        return s + query_length, self.seen - s

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending:
            raise UnsupportedModelError(
                f"KV policy {self.policy.name!r} needs the attention scores of each step, but layer {self.layer_idx} "
                "of this model computed attention without hf_accel's attention hook (a custom attention "
                "implementation?). Use attn_implementation='sdpa' or 'eager', or the 'sink' policy, which needs no scores"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        if self.policy is not None:
            if self.cache.all_real_from(self.seen):  # decode: generated tokens are real
                pos = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32).expand(b, h, q)
            else:
                real = self.cache.real_tokens(self.seen, q, b, key_states.device)  # [B, q] bool
                pos = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32)
                pos = torch.where(real, pos, -1)[:, None, :].expand(b, h, q)
            self.pos = pos.contiguous() if self.pos is None else torch.cat([self.pos, pos], dim=-1)
            if self.policy.accumulates:
                zeros = key_states.new_zeros((b, h, q), dtype=torch.float32)
                self.acc = zeros if self.acc is None else torch.cat([self.acc, zeros], dim=-1)
        self.seen += q
        self.cumulative_length = self.seen
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.quant is not None and self.quant.length:
            qk, qv = self.quant.materialize()
            keys, values = torch.cat([qk, self.keys], dim=-2), torch.cat([qv, self.values], dim=-2)
        else:
            keys, values = self.keys, self.values
        # Everything below changes storage only: the tensors returned above are what this step attends to.
        self._flush()
        if self.policy is not None:
            if self.policy.needs_attention and self.policy.wants_scores(self, q):
                self.pending = True
                PENDING.set(self)
            else:
                self.evict(q)
        return keys, values

    def _flush(self) -> None:
        """kvquant: quantize all but the `residual` most recent full-precision slots."""
        if self.quant is None:
            return
        n = self.keys.shape[-2] - self.quant_config.residual
        if n > 0 and (n >= FLUSH_EVERY or self.keys.shape[-2] > 1 and not self.quant.length):
            self.quant.append(self.keys[..., :n, :], self.values[..., :n, :])
            self.keys, self.values = self.keys[..., n:, :].contiguous(), self.values[..., n:, :].contiguous()

    # -- eviction ----------------------------------------------------------------------------------------------------
    def observe(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """Called by the attention hook with this step's queries and the keys it attended to (stored + new)."""
        self.pending = False
        PENDING.set(None)
        self.policy.observe(self, query, keys, scaling)
        self.evict(query.shape[-2])

    def evict(self, q_len: int) -> None:
        budget = self.policy.budget
        if self.stored() <= budget + self.policy.slack or not self.policy.evicts_now(self, q_len):
            return
        n_fixed = self.keys.shape[-2] if self.quant is not None else 0  # kvquant: the fp window is always kept
        n_cand = self.stored() - n_fixed
        keep = budget - n_fixed
        pos = self.pos[..., :n_cand]
        score = self.policy.score(self, pos).float()
        score = torch.where(self.policy.protected(self, pos), math.inf, score)
        score = torch.where(pos < 0, -math.inf, score)  # padding goes first
        top = top_slots(score, pos, keep)  # ties to the earlier position: the same tokens however padded
        idx = top.gather(-1, pos.gather(-1, top).argsort(dim=-1, stable=True))  # back to position order: padding first
        if self.quant is not None:
            self.quant.gather(idx)
        else:
            self.keys, self.values = _gather(self.keys, idx), _gather(self.values, idx)
        rest = slice(n_cand, None)
        self.pos = torch.cat([pos.gather(-1, idx), self.pos[..., rest]], dim=-1)
        if self.acc is not None:
            self.acc = torch.cat([self.acc[..., :n_cand].gather(-1, idx), self.acc[..., rest]], dim=-1)

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        n = sum(t.nbytes for t in (self.keys, self.values, self.pos, self.acc) if t is not None)
        return n + (self.quant.nbytes() if self.quant is not None else 0)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K/V as the attention sees them (dequantised where quantized)."""
        if self.quant is not None and self.quant.length:
            qk, qv = self.quant.materialize()
            return torch.cat([qk, self.keys], dim=-2), torch.cat([qv, self.values], dim=-2)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.seen, self.pos, self.acc, self.pending = 0, None, None, False
        if self.quant_config is not None:
            self.quant = QuantStore(self.quant_config.bits, self.quant_config.group)

    def crop(self, tokens_to_remove: int) -> None:
        raise AccelError("an hf_accel KV cache cannot be cropped (evicted or quantized tokens cannot be restored)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        super().batch_select_indices(indices)
        self.pos = self.pos[indices] if self.pos is not None else None
        self.acc = self.acc[indices] if self.acc is not None else None
        if self.quant is not None:
            self.quant.batch_select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        super().batch_repeat_interleave(repeats)
        for name in ("pos", "acc"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))
        if self.quant is not None:
            self.quant.tensors = {n: t.repeat_interleave(repeats, dim=0) for n, t in self.quant.tensors.items()}
            if self.quant.channel is not None:
                self.quant.channel = self.quant.channel.repeat_interleave(repeats, dim=0)


class KVCache(Cache):
    """The cache the KV plugins' generate wrapper builds: one `KVLayer` per decoder layer, the policy and kvquant
    settings of the model, and the attention mask of the current generate call (for padding)."""

    def __init__(self, num_layers: int, policy=None, quant: "KVQuant | None" = None):
        if policy is not None and quant is not None and policy.budget <= quant.residual + FLUSH_EVERY + policy.min_kept:
            raise AccelError(
                f"{policy.name}(budget {policy.budget}) + kvquant(residual={quant.residual}): the budget must exceed "
                f"the full-precision window (residual + {FLUSH_EVERY}) by more than {policy.min_kept} tokens; lower "
                "kvquant's residual or raise the budget"
            )
        self.policy, self.quant_config = policy, quant
        self.mask: torch.Tensor | None = None  # [B, L] bool, the current call's attention mask
        self.first: torch.Tensor | None = None
        make = getattr(policy, "make_layer", None)  # policies with their own storage layout (duo, quest)
        layers = [make(self, i) if make is not None else KVLayer(self, i, policy, quant) for i in range(num_layers)]
        super().__init__(layers=layers)

    def set_attention_mask(self, mask: torch.Tensor | None) -> None:
        self.first = None
        if mask is None:
            self.mask = None
            return
        mask = mask.bool()
        if self.policy is not None and mask.shape[-1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise AccelError(
                f"KV policy {self.policy.name!r} needs left-padded batches (each row of attention_mask 0..0 1..1); "
                "this attention_mask has padding after real tokens. Pad on the left (tokenizer.padding_side='left')"
            )
        self.mask = mask
        self.first = (~mask).sum(-1).to(torch.int32)  # leading padding per row

    def all_real_from(self, start: int) -> bool:
        """True when every token from `start` on is real (tokens generated after the mask are)."""
        return self.mask is None or start >= self.mask.shape[-1]

    def _mask(self, batch: int, device) -> torch.Tensor:
        m = self.mask.to(device)
        if m.shape[0] != batch:  # num_return_sequences / beams expand the batch after the mask was handed over
            m = m.repeat_interleave(batch // m.shape[0], dim=0)
        return m

    def first_real(self, batch: int, device) -> torch.Tensor:
        """[batch] position of each row's first real token (its number of leading padding tokens)."""
        if self.mask is None:
            return torch.zeros(batch, dtype=torch.int32, device=device)
        if self.first.shape[0] == batch and self.first.device == torch.device(device):
            return self.first
        return (~self._mask(batch, device)).sum(-1).to(torch.int32)

    def real_tokens(self, start: int, q: int, batch: int, device) -> torch.Tensor:
        """[batch, q] bool: which of the tokens at positions [start, start + q) are real (not padding)."""
        if self.mask is None:
            return torch.ones(batch, q, dtype=torch.bool, device=device)
        part = self._mask(batch, device)[:, start:start + q]
        if part.shape[1] < q:  # tokens generated in this call are real
            part = torch.cat([part, part.new_ones(batch, q - part.shape[1])], dim=1)
        return part

    @property
    def runtime_servable(self) -> bool:
        """The fast runtime may serve a call given this cache (hf_accel/runtime/__init__.py, contract point 2): kvquant
        alone (the runtime's static quantized layers, `_fast.py`) or an eviction policy alone that has static layers
        (`fast_servable`: snapkv, sink, h2o, adakv; `_fast_evict.py`), and nothing stored yet (multi-turn continues
        here). The cache is then used only if the call falls back to transformers' loop."""
        servable = self.policy is None or (self.quant_config is None and getattr(self.policy, "fast_servable", False))
        return servable and self.get_seq_length() == 0

    # -- what is stored ----------------------------------------------------------------------------------------------
    def stored_tokens(self) -> list[int]:
        return [layer.stored() for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
