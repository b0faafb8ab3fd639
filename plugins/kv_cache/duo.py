"""`duo`: DuoAttention's retrieval / streaming head split (Xiao et al. 2024, arXiv:2410.10819), head-wise storage.

Each KV head is either a retrieval head, which keeps the full cache, or a streaming head, which keeps only its
row's first `sinks` real tokens and `window` most recent ones. The two kinds are stored apart, per layer:

    retrieval heads  [B, H_r, seen, D]               (a buffer written in place)
    streaming heads  [B, H_s, <= sinks + window + slack, D]  positions [B, n_s] (-1 = padding)

so the memory of a streaming head really is bounded (nothing is masked in a full-size tensor). Attention is
computed per kind by the layer (`attend`, called by hf_accel's attention hook): retrieval heads through the
model's own attention function with transformers' mask; streaming heads by grouped SDPA over their own slots, with
a mask built from their positions (causal, pad-aware). Prefill is exact for retrieval heads; streaming heads see,
at every step, what they have kept plus the step's new tokens.

The split is the option `heads`: one group of '0'/'1' per layer (one character per KV head, 1 = retrieval),
joined by '.', e.g. "11.01.00.10". It is part of the spec, so it is saved in the artifact's config.json and
restored by `from_pretrained`. `calibrate_duo(model, input_ids)` measures, per KV head, how much the streaming
pattern changes the head's attention output on calibration prompts and makes the `ratio` heads that change most
retrieval heads (DuoAttention trains gates on passkey data; this is the training-free proxy of the same quantity).
With `heads` empty, the first `generate()` calibrates on synthetic data (random tokens, repeated: copying back
across the window is what retrieval heads do) and records the split in the applied spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from hf_accel.errors import AccelError, OptionError

from ._generate import KV_PLUGINS, KVPlugin, base_attention
from ._layers import SELF_ATTEND, top_slots
from ._store import BufferedLayer, grouped_attention, step_positions


def parse_heads(heads: str) -> list[list[bool]]:
    return [[c == "1" for c in group] for group in heads.split(".")] if heads else []


def format_heads(mask: list[list[bool]]) -> str:
    return ".".join("".join("1" if r else "0" for r in layer) for layer in mask)


class DuoLayer(BufferedLayer):
    # self.buf holds the retrieval heads; sk/sv: streaming heads [B, H_s, n_s, D], spos: their positions [B, n_s]
    row_state = ("sk", "sv", "spos")

    def __init__(self, cache, layer_idx: int, policy: "DuoPolicy"):
        super().__init__(cache, layer_idx)
        self.policy = policy
        split = parse_heads(policy.heads)[layer_idx]
        self.r_heads = [h for h, r in enumerate(split) if r]
        self.s_heads = [h for h, r in enumerate(split) if not r]
        self.step = None  # this step's streaming K/V/positions (before eviction) and new positions

    def stored_streaming(self) -> int:
        return 0 if self.spos is None else self.spos.shape[1]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, d = key_states.shape
        if len(self.r_heads) + len(self.s_heads) != h:
            raise AccelError(f"duo: layer {self.layer_idx} has {h} KV heads but the head split names "
                             f"{len(self.r_heads) + len(self.s_heads)}")
        pos = step_positions(self.cache, self.seen, q, b, key_states.device)
        r_idx = torch.tensor(self.r_heads, device=key_states.device, dtype=torch.long)
        s_idx = torch.tensor(self.s_heads, device=key_states.device, dtype=torch.long)
        rk, rv = self.buf.append(key_states.index_select(1, r_idx), value_states.index_select(1, r_idx))
        nk, nv = key_states.index_select(1, s_idx), value_states.index_select(1, s_idx)
        if self.sk is None:
            sk, sv, spos = nk, nv, pos
        else:
            sk, sv, spos = torch.cat([self.sk, nk], 2), torch.cat([self.sv, nv], 2), torch.cat([self.spos, pos], 1)
        self.step = (sk, sv, spos, torch.arange(self.seen, self.seen + q, device=key_states.device))
        self.sk, self.sv, self.spos = sk, sv, spos
        self.seen += q
        self.cumulative_length = self.seen
        self._evict()
        self.keys, self.values = rk, rv
        SELF_ATTEND.set(self)
        return rk, rv

    def _evict(self) -> None:
        p = self.policy
        n = self.spos.shape[1]
        if n <= p.sinks + p.window + p.slack:
            return
        first = self.cache.first_real(self.spos.shape[0], self.spos.device)[:, None]
        sink = (self.spos >= first) & (self.spos < first + p.sinks)
        score = torch.where(sink, math.inf, self.spos.float())  # recency (padding: -1, first out); sinks pinned
        keep = top_slots(score, self.spos, p.sinks + p.window).sort(-1).values  # [B, keep], position order
        self.spos = self.spos.gather(1, keep)
        idx = keep[:, None, :, None].expand(-1, self.sk.shape[1], -1, self.sk.shape[-1])
        self.sk, self.sv = self.sk.gather(2, idx), self.sv.gather(2, idx)

    def attend(self, module, query, key, value, attention_mask, scaling, base, *args, **kwargs):
        b, hq, q, d = query.shape
        h = len(self.r_heads) + len(self.s_heads)
        g = hq // h
        out = query.new_empty(b, q, hq, d)
        if self.r_heads:
            rq = torch.tensor([hh * g + i for hh in self.r_heads for i in range(g)], device=query.device)
            o, _ = base_attention(base, module)(module, query.index_select(1, rq), key, value, attention_mask,
                                                *args, scaling=scaling, **kwargs)
            out[:, :, rq] = o.to(out.dtype)
        if self.s_heads:
            sq = torch.tensor([hh * g + i for hh in self.s_heads for i in range(g)], device=query.device)
            sk, sv, spos, q_pos = self.step
            n_s = spos.shape[1]
            visible = (spos[:, None, :] >= 0) & (spos[:, None, :] <= q_pos[None, :, None])  # [B, q, n_s]
            own = torch.arange(n_s - q, n_s, device=query.device)  # a query always sees its own key
            visible = visible | (torch.arange(n_s, device=query.device)[None, :] == own[:, None])[None]
            out[:, :, sq] = grouped_attention(query.index_select(1, sq), sk, sv, visible[:, None], scaling).to(out.dtype)
        self.step = None
        return out, None

    def reset(self) -> None:
        super().reset()
        self.step = None


@dataclass
class DuoPolicy(KVPlugin):
    """DuoAttention: retrieval heads keep the full cache, streaming heads keep sinks + a recent window (stored apart)."""

    name = "duo"
    needs_attention = True  # the layer computes the two kinds of heads itself, through the attention hook
    conflicts_with = KV_PLUGINS + ("kvquant",)
    heads: str = ""  # per layer '0'/'1' per KV head (1 = retrieval), '.'-joined; empty: calibrate on first use
    ratio: float = 0.5  # share of retrieval heads chosen by calibration
    sinks: int = 64  # first real tokens a streaming head keeps
    window: int = 256  # most recent tokens a streaming head keeps
    slack: int = 32  # streaming heads evict back to sinks + window once they hold this many more

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise OptionError(f"plugin 'duo': option 'ratio' must be in [0, 1], got {self.ratio}")
        if self.sinks < 0 or self.window < 1 or self.slack < 0:
            raise OptionError(f"plugin 'duo': need sinks >= 0, window >= 1, slack >= 0 "
                              f"(got sinks={self.sinks}, window={self.window}, slack={self.slack})")
        if self.heads and set(self.heads) - set("01."):
            raise OptionError(f"plugin 'duo': option 'heads' is one group of '0'/'1' per layer (1 = retrieval "
                              f"head), joined by '.', e.g. '10.01'; got {self.heads[:60]!r}")

    def check(self, model):
        super().check(model)
        if self.heads:
            text = model.config.get_text_config()
            kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            groups = self.heads.split(".")
            if len(groups) != text.num_hidden_layers or any(len(grp) != kv for grp in groups):
                raise OptionError(
                    f"plugin 'duo': option 'heads' must have {text.num_hidden_layers} '.'-joined groups of {kv} "
                    f"characters (layers x KV heads of {type(model).__name__}); got {len(groups)} groups of lengths "
                    f"{sorted({len(grp) for grp in groups})}. Calibrate with calibrate_duo(model, ...)")

    def prepare(self, model) -> None:
        if not self.heads:
            calibrate_duo(model)

    def make_layer(self, cache, layer_idx):
        return DuoLayer(cache, layer_idx, self)

    def card_metadata(self, model):
        mask = parse_heads(self.heads)
        share = sum(map(sum, mask)) / max(1, sum(map(len, mask))) if mask else None
        return {"kv_retrieval_head_share": share, "kv_streaming_sinks": self.sinks, "kv_streaming_window": self.window}


# -- calibration -----------------------------------------------------------------------------------------------------

CALIB_IMPL = "hf_accel_duo_calibrate"
_CALIB: dict = {}


def _calibration_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The model's own attention (output unchanged), plus, for the last `last` queries of every KV head, the relative
    error of the attention output when the head may only see sinks + window (accumulated in _CALIB)."""
    out = base_attention(_CALIB["base"], module)(module, query, key, value, attention_mask, *args, **kwargs)
    b, hq, q, d = query.shape
    hk, n = key.shape[1], key.shape[2]
    g, last = hq // hk, min(_CALIB["last"], q)
    scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or d ** -0.5
    qo = query[:, :, q - last:].reshape(b, hk, g, last, d).float()
    logits = torch.einsum("bhgqd,bhnd->bhgqn", qo, key.float()) * scaling
    q_pos = torch.arange(n - last, n, device=key.device)[:, None]
    j = torch.arange(n, device=key.device)[None]
    causal = j <= q_pos
    stream = causal & ((j < _CALIB["sinks"]) | (j > q_pos - _CALIB["window"]))
    v = value.float()[:, :, None]
    full = torch.matmul(logits.masked_fill(~causal, -math.inf).softmax(-1), v)
    part = torch.matmul(logits.masked_fill(~stream, -math.inf).softmax(-1), v)
    err = ((full - part).pow(2).sum(-1) / full.pow(2).sum(-1).clamp(min=1e-12)).mean(dim=(0, 2, 3))  # [hk]
    layer = module.layer_idx
    _CALIB["err"][layer] = _CALIB["err"].get(layer, 0) + err.cpu()
    return out


def synthetic_calibration_ids(model, length: int = 1024, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random tokens whose second half repeats the first: retrieval heads copy across the window, others cannot."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    half = torch.randint(min(10, vocab - 1), vocab, (batch, length // 2), generator=g)
    return torch.cat([half, half], dim=1)


@torch.no_grad()
def calibrate_duo(model, input_ids: torch.Tensor | None = None, *, ratio: float | None = None, sinks: int | None = None,
                  window: int | None = None, last: int = 64) -> str:
    """Choose the retrieval heads of `model` and return the `heads` option string.

    input_ids [B, T] (no padding): calibration prompts, ideally long-context retrieval (needle) text with T well
    above sinks + window; default: synthetic repeated random tokens. If `duo` is applied to `model`, its `heads`
    option is set (and the model's saved spec follows); the plugin's ratio / sinks / window are the defaults."""
    from hf_accel.apply import find_applied, options_changed

    found = find_applied(model, "duo")
    plugin = found[0] if found else DuoPolicy()
    ratio = plugin.ratio if ratio is None else ratio
    sinks = plugin.sinks if sinks is None else sinks
    window = plugin.window if window is None else window
    text = model.config.get_text_config()
    if input_ids is None:
        length = min(int(getattr(text, "max_position_embeddings", 2048) or 2048), 2 * (sinks + window) + 2 * last, 4096)
        input_ids = synthetic_calibration_ids(model, max(length, 64))
    config = model.config
    old = config._attn_implementation
    base = old.split(":", 1)[1] if old.startswith("hf_accel_kv:") else old
    if base not in ("sdpa", "eager"):
        raise AccelError(f"calibrate_duo needs attn_implementation 'sdpa' or 'eager'; this model uses {old!r}")
    AttentionInterface.register(CALIB_IMPL, _calibration_attention)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionMaskInterface.register(CALIB_IMPL, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])
    _CALIB.clear()
    _CALIB.update(base=base, last=last, sinks=sinks, window=window, err={})
    config._attn_implementation_internal = CALIB_IMPL
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        config._attn_implementation_internal = old
    errs = _CALIB.pop("err")
    _CALIB.clear()
    n_layers = text.num_hidden_layers
    if sorted(errs) != list(range(n_layers)):
        raise AccelError(f"calibrate_duo: only layers {sorted(errs)} of {n_layers} ran the calibration attention")
    table = torch.stack([errs[i] for i in range(n_layers)])  # [layers, kv heads]
    k = round(ratio * table.numel())
    chosen = torch.zeros(table.numel(), dtype=torch.bool)
    if k:
        chosen[table.flatten().topk(k).indices] = True
    heads = format_heads(chosen.view_as(table).tolist())
    if found:
        plugin.heads = heads
        options_changed(model)
    return heads
