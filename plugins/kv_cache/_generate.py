"""How a KV plugin reaches a model: a per-instance `generate` wrapper that builds the cache, and, for policies that
score tokens by attention, an attention hook.

- `generate`: each KV plugin wraps `model.generate` through the Patcher (so `hf_accel.remove` restores it, and
  pipelines, which call `model.generate`, get it too). When the caller passes no cache, the wrapper builds a
  `KVCache` from the model's current KV settings (eviction policy and/or kvquant) and passes it as
  `past_key_values`; a `KVCache` passed back in (multi-turn) is reused; any other cache the caller passes is left
  alone. The wrapper always hands the call's attention mask to the cache (and passes that same mask on), because
  cache layers never see it. Several KV plugins (and other plugins) chain: each wraps what was there before.
- attention hook: the model's attention implementation `sdpa`/`eager` is renamed `hf_accel_kv:sdpa`/`...:eager`,
  registered in transformers' AttentionInterface (a new key; no global function is replaced) with the same mask
  function. It runs the original attention (for eager, the model's own `eager_attention_forward`, which
  AttentionInterface does not hold), then, if a layer of ours is waiting (`PENDING`), hands it the step's
  queries and the keys just attended to, from which the policy takes q.K scores of this step only: no full
  attention matrix is kept and eager attention is not required.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_accel.compat import cache_kwarg, get_cache
from hf_accel.errors import OptionError, UnsupportedModelError
from hf_accel.plugin import Family, Plugin
from hf_accel.runtime.attention import FAST_SDPA, as_kind, fast_sdpa, register_fast_variant
from hf_accel.runtime.cache import KV_LAYER_ATTR

from ._layers import PENDING, SELF_ATTEND, KVCache

POLICY_ATTR = "_hf_accel_kv_policy"
QUANT_ATTR = "_hf_accel_kv_quant"
HOOK_PREFIX = "hf_accel_kv:"
HOOKABLE = ("sdpa", "eager")
KV_PLUGINS = ("sink", "h2o", "snapkv", "duo", "quest")  # cache policies: one per model


# -- attention hook --------------------------------------------------------------------------------------------------

def base_attention(base: str, module):
    """The attention function the hooked implementation `base` stands for, as `module`'s model would call it.
    "eager" is not registered in AttentionInterface: each model passes its own `eager_attention_forward` as the
    default, so it is taken from the module's modeling file."""
    if base != "eager" or base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"hf_accel's KV attention hook found no `eager_attention_forward` next to {type(module).__name__} (in "
            f"{type(module).__module__}); load the model with attn_implementation='sdpa'")
    return fn


def _hooked(base: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if base == "eager" and attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = as_kind(attention_mask, "additive", query.dtype)  # the fast runtime's bool mask
        owner = SELF_ATTEND.get()
        if owner is not None and owner.layer_idx == getattr(module, "layer_idx", owner.layer_idx):
            SELF_ATTEND.set(None)
            scaling = kwargs.pop("scaling", None) or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            return owner.attend(module, query, key, value, attention_mask, scaling, base, *args, **kwargs)
        out = base_attention(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
        layer = PENDING.get()
        if layer is not None and layer.layer_idx == getattr(module, "layer_idx", layer.layer_idx):
            scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            layer.observe(query, key, scaling)
        return out

    return attention


def _hooked_fast(module, query, key, value, attention_mask, *args, **kwargs):
    """The hook over the fast runtime's `fast_sdpa` (its variant of "hf_accel_kv:sdpa"): prompt forwards (eager,
    any length, one token included) hand their queries to a waiting layer (`_fast_evict`: SnapKV's selection, h2o's
    scores); compiled decode steps trace plain `fast_sdpa` (no layer waits then)."""
    out = fast_sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    if not torch.compiler.is_compiling():
        layer = PENDING.get()
        if layer is not None and layer.layer_idx == getattr(module, "layer_idx", layer.layer_idx):
            scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            layer.observe(query, key, scaling)
    return out


def hook_name(base: str) -> str:
    name = HOOK_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _hooked(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])
        if base == "sdpa":  # inside the fast runtime: the same hook over `fast_sdpa`
            fast = HOOK_PREFIX + FAST_SDPA
            AttentionInterface.register(fast, _hooked_fast)
            # No mask function, as for `fast_sdpa` itself: the runtime passes every mask (4-D, or None for an
            # unpadded causal prompt). With sdpa's, transformers built a one-token prompt's mask over the cache's
            # capacity (a compileable cache gets no is_causal skip at one query), wider than the one key attended.
            register_fast_variant(name, fast)
    return name


def attention_scores(layer, query: torch.Tensor, keys: torch.Tensor, scaling: float, last: int) -> torch.Tensor:
    """Softmax attention of the `last` queries of this step over the keys, summed over those queries and over the
    query heads of each KV head: [B, kv_heads, n]. Causal and padding masks come from the slots' positions."""
    b, hq, q, d = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    if q == 1:  # decode: the one query sees every stored slot but padding; few kernels, no float copy of K
        logits = torch.matmul(query.reshape(b, hk, hq // hk, d), keys.transpose(-1, -2)).float() * scaling
        logits = logits.masked_fill((layer.pos < 0)[:, :, None, :], -math.inf)
        return logits.softmax(-1).nan_to_num_(0.0).sum(2)
    last = min(last, q)
    qo = query[:, :, q - last:].reshape(b, hk, hq // hk, last, d)
    logits = torch.einsum("bhgqd,bhnd->bhgqn", qo, keys).float() * scaling
    q_pos = torch.arange(layer.seen - last, layer.seen, device=keys.device)
    pos = layer.pos  # [B, hk, n]
    visible = (pos[:, :, None, None, :] >= 0) & (pos[:, :, None, None, :] <= q_pos[None, None, None, :, None])
    probs = logits.masked_fill(~visible, -math.inf).softmax(-1).nan_to_num_(0.0)  # a padding query sees nothing
    q_real = (pos[:, :, n - last:] >= 0).float()  # [B, hk, last]: the step's own slots are the last q
    return torch.einsum("bhgqn,bhq->bhn", probs, q_real)


def pool_votes(votes: torch.Tensor, real: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV's pooling of votes [..., n] over `kernel` neighbouring slots (real [..., n]: the slot holds a token).

    "max": the window's largest vote (votes are >= 0 and padding slots get 0, so padding never wins a window).
    "avg": the mean over the window's real slots only, as exact sums (the window's slots added left to right, then
    divided by their count): a row's scores are the same bits whatever padding precedes it. avg_pool1d's
    count_include_pad=False still counted padding slots, so a row's first tokens were diluted by the padding of
    the batch, and an extra padding column changed the scores of a row that had none."""
    if pooling == "max":
        return torch.nn.functional.max_pool1d(votes.reshape(-1, 1, votes.shape[-1]), kernel, 1, kernel // 2).view_as(votes)
    n, half = votes.shape[-1], kernel // 2
    r = real.to(votes.dtype)
    x = torch.nn.functional.pad(votes * r, (half, half))
    c = torch.nn.functional.pad(r, (half, half))
    total, count = x[..., 0:n], c[..., 0:n]
    for i in range(1, kernel):
        total, count = total + x[..., i:i + n], count + c[..., i:i + n]
    return total / count.clamp(min=1)


# -- generate wrapper ------------------------------------------------------------------------------------------------

def _input_ids(args, kwargs):
    ids = kwargs.get("input_ids", kwargs.get("inputs"))
    return args[0] if ids is None and args and isinstance(args[0], torch.Tensor) else ids


def wrap_generate(model, original):
    @functools.wraps(original)
    def generate(*args, **kwargs):
        cache = get_cache(kwargs)
        if cache is None and kwargs.get("use_cache", True) and not kwargs.get("cache_implementation"):
            policy, quant = getattr(model, POLICY_ATTR, None), getattr(model, QUANT_ATTR, None)
            if hasattr(policy, "prepare"):  # e.g. duo calibrates its head split on first use
                policy.prepare(model)
            cache = KVCache(model.config.get_text_config().num_hidden_layers, policy, quant)
            kwargs[cache_kwarg(model)] = cache
            if getattr(model.generation_config, "cache_implementation", None):
                kwargs["cache_implementation"] = None  # the user's cache and a cache_implementation cannot mix
        if isinstance(cache, KVCache):
            mask = kwargs.get("attention_mask")
            ids = _input_ids(args, kwargs)
            if mask is None and ids is not None and ids.dim() == 2:
                config = kwargs.get("generation_config") or model.generation_config
                pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
                eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
                eos = eos if isinstance(eos, (list, tuple)) else [eos]
                if pad is not None and pad not in eos and bool((ids == pad).any()):
                    mask = (ids != pad).long()  # what generate() would infer; passed on so both agree
                else:
                    mask = torch.ones_like(ids)
                kwargs["attention_mask"] = mask
            cache.set_attention_mask(mask)
        return original(*args, **kwargs)

    generate._hf_accel_kv = True
    return generate


# -- the plugins' shared base ----------------------------------------------------------------------------------------

def _check_model(plugin: Plugin, model) -> None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"plugin {plugin.name!r} supports decoder-only models; "
                                    f"{type(model).__name__} is an encoder-decoder model")
    text = config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise UnsupportedModelError(
            f"plugin {plugin.name!r} needs every layer to use full attention; {type(model).__name__} has layer "
            f"types {sorted(kinds)} (sliding-window / linear-attention layers keep their own caches)")
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False:
        raise UnsupportedModelError(
            f"plugin {plugin.name!r}: {type(model).__name__} uses sliding-window attention "
            f"(sliding_window={text.sliding_window}); a KV policy would evict inside the window's mask")


@dataclasses.dataclass
class KVPlugin(Plugin):
    """What every KV plugin does on apply: record itself on the model and wrap `generate` (once per plugin)."""

    family = Family.KV_CACHE
    attr: ClassVar[str] = POLICY_ATTR
    needs_attention: ClassVar[bool] = False

    def check(self, model):
        super().check(model)
        _check_model(self, model)
        if self.needs_attention:
            impl = model.config._attn_implementation
            if impl not in HOOKABLE and not str(impl).startswith(HOOK_PREFIX):
                raise UnsupportedModelError(
                    f"plugin {self.name!r} reads each step's attention scores through hf_accel's attention hook, "
                    f"which wraps {' and '.join(HOOKABLE)}; this model uses attn_implementation={impl!r}. Load it "
                    "with attn_implementation='sdpa' (or use 'sink', which needs no scores)")

    def apply(self, model, patcher):
        patcher.set_attr(model, self.attr, self)
        if self.needs_attention and not str(model.config._attn_implementation).startswith(HOOK_PREFIX):
            patcher.set_attr(model.config, "_attn_implementation_internal", hook_name(model.config._attn_implementation))
        patcher.set_attr(model, "generate", wrap_generate(model, model.generate))


@dataclasses.dataclass
class EvictionPolicy(KVPlugin):
    """Base of the eviction plugins (kvpress's ScorerPress): a subclass says which tokens to keep through
    `score()` (higher = keep) and `protected()`; the layer does the top-k, per batch row and KV head."""

    conflicts_with = KV_PLUGINS
    accumulates: ClassVar[bool] = False  # keeps a running score per slot (layer.acc)
    # `policy+fast` decodes inside the fast runtime (`_fast_evict.EvictLayerFactory`, installed by apply)
    fast_servable: ClassVar[bool] = False

    # Tokens the cache may hold above the budget before it evicts back down to it: one top-k and gather every
    # `slack` steps instead of every step. Memory bound: budget + slack tokens per KV head.
    slack: int = 32

    @property
    def budget(self) -> int:
        raise NotImplementedError

    @property
    def min_kept(self) -> int:  # slots that protected() may pin in the quantized part (sinks)
        return 0

    def _positive(self, **options) -> None:
        if self.slack < 0:
            raise OptionError(f"plugin {self.name!r}: option 'slack' must be >= 0, got {self.slack}")
        for key, value in options.items():
            if value < 1:
                raise OptionError(f"plugin {self.name!r}: option {key!r} must be >= 1, got {value}")

    def wants_scores(self, layer, q_len: int) -> bool:
        return True

    def evicts_now(self, layer, q_len: int) -> bool:
        return True

    def observe(self, layer, query, keys, scaling) -> None:
        pass

    def score(self, layer, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def protected(self, layer, pos: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(pos, dtype=torch.bool)

    def apply(self, model, patcher):
        super().apply(model, patcher)
        if self.fast_servable:
            from ._fast_evict import EvictLayerFactory

            patcher.set_attr(model, KV_LAYER_ATTR, EvictLayerFactory(model))

    def card_metadata(self, model):
        return {"kv_budget_tokens": self.budget}


def recent(layer, pos: torch.Tensor, n: int) -> torch.Tensor:
    """The slots among the `n` most recent positions."""
    return pos >= layer.seen - n


def first_real(layer, pos: torch.Tensor, n: int) -> torch.Tensor:
    """The slots holding a row's first `n` real tokens (its attention sinks)."""
    start = layer.cache.first_real(pos.shape[0], pos.device)[:, None, None]
    return (pos >= 0) & (pos < start + n)
