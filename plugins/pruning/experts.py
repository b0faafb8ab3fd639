"""`prune_experts`: MoE expert pruning (in the spirit of STUN, arXiv:2409.06211, and HEAPr: drop whole experts,
scored by what they contribute on calibration data). Every MoE layer keeps the same number of experts, so the config
(`num_experts` / `num_local_experts`) shrinks and the result is an ordinary, smaller checkpoint of the same class.

Score of expert e in a layer: sum over calibration tokens routed to it of routing weight x ||expert_e(x)||, the
expert's share of the layer output (router-weighted output energy). Works on transformers' fused-expert MoE blocks
(`mlp.gate` router with weight (E, H), `mlp.experts.gate_up_proj` (E, 2I, H) / `down_proj` (E, H, I)): Qwen2-MoE,
Mixtral, Qwen3-MoE and relatives."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_accel.errors import OptionError, UnsupportedModelError
from hf_accel.plugin import Family, ModelKind, Plugin

from . import calibration as cal

EXPERT_KEYS = ("num_experts", "num_local_experts")


def moe_blocks(model) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        experts, gate = getattr(m, "experts", None), getattr(m, "gate", None)
        if (experts is not None and gate is not None and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
                and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
                and getattr(gate, "weight", None) is not None and gate.weight.dim() == 2
                and gate.weight.shape[0] == experts.gate_up_proj.shape[0]):
            out.append((name, m))
    return out


def _expert_out(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@torch.no_grad()
def expert_scores(model, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per MoE block: (E,) router-weighted output norms summed over the calibration tokens."""
    blocks = moe_blocks(model)
    scores = [torch.zeros(m.experts.gate_up_proj.shape[0], device=m.experts.gate_up_proj.device) for _, m in blocks]
    handles = []
    for (_, block), s in zip(blocks, scores):
        def hook(mod, args, s=s):
            x, idx, w = args[0], args[1], args[2]
            for e in idx.unique().tolist():
                if 0 <= e < s.numel():
                    tok, slot = torch.where(idx == e)
                    y = _expert_out(mod, e, x[tok].to(mod.gate_up_proj.dtype)).float()
                    s[e] += (w[tok, slot].float() * y.norm(dim=-1)).sum()
        handles.append(block.experts.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for batch in ids.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return scores


@torch.no_grad()
def drop_experts(model, scores: list[torch.Tensor], keep: int, patcher=None) -> dict:
    """Keep the `keep` highest-scoring experts of every MoE block; router rows and expert weights are sliced."""
    blocks = moe_blocks(model)
    for (name, block), s in zip(blocks, scores):
        idx = s.topk(keep).indices.sort().values.to(block.gate.weight.device)
        for obj, attr in ((block.experts, "gate_up_proj"), (block.experts, "down_proj"), (block.gate, "weight")):
            new = nn.Parameter(getattr(obj, attr).data[idx].clone(), requires_grad=getattr(obj, attr).requires_grad)
            if patcher is not None:
                patcher.set_attr(obj, attr, new)  # nn.Module.__setattr__ registers the parameter; undo restores it
            else:
                setattr(obj, attr, new)
        for obj in (block.experts, block.gate):
            if hasattr(obj, "num_experts"):
                patcher.set_attr(obj, "num_experts", keep) if patcher is not None else setattr(obj, "num_experts", keep)
    for key in EXPERT_KEYS:
        if getattr(model.config, key, None) is not None:
            patcher.set_attr(model.config, key, keep) if patcher is not None else setattr(model.config, key, keep)
    return {"experts_kept": keep, "moe_layers": len(blocks)}


@dataclass
class PruneExperts(Plugin):
    """MoE expert pruning: drops the least-used experts (router-weighted output norm); the config shrinks."""

    name = "prune_experts"
    family = Family.PRUNING
    supported_kinds = frozenset({ModelKind.CAUSAL_LM})
    rewrites_weights = True
    order = 90  # before weight pruning of what is left

    ratio: float = 0.25  # fraction of experts removed in every MoE layer
    samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    tokenizer: str | None = None

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise OptionError(f"plugin 'prune_experts': ratio must be in (0, 1), got {self.ratio}")

    def check(self, model):
        super().check(model)
        if not moe_blocks(model) or not any(getattr(model.config, k, None) for k in EXPERT_KEYS):
            raise UnsupportedModelError(
                f"plugin 'prune_experts' needs a mixture-of-experts model with fused experts (mlp.gate router, "
                f"mlp.experts.gate_up_proj / down_proj); {type(model).__name__} has none. Accepted: Qwen2-MoE, "
                "Mixtral, Qwen3-MoE and relatives")
        n = next(getattr(model.config, k) for k in EXPERT_KEYS if getattr(model.config, k, None))
        if self.keep_of(n) < getattr(model.config, "num_experts_per_tok", 1):
            raise OptionError(f"plugin 'prune_experts': ratio={self.ratio} would leave {self.keep_of(n)} of {n} "
                              f"experts, fewer than num_experts_per_tok={model.config.num_experts_per_tok}")

    def keep_of(self, n: int) -> int:
        return max(1, int(round(n * (1 - self.ratio))))

    def apply(self, model, patcher):
        n = next(getattr(model.config, k) for k in EXPERT_KEYS if getattr(model.config, k, None))
        ids = cal.calibration_ids(model, cal.load_tokenizer(model, self.tokenizer), self.samples, self.seq_len)
        self._facts = drop_experts(model, expert_scores(model, ids, self.batch_size), self.keep_of(n), patcher)

    def prepare_for_loading(self, model, patcher):
        """The saved config already has the smaller expert count."""

    def card_metadata(self, model):
        return dict(getattr(self, "_facts", {}))
