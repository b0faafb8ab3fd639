"""Logits processing and token choice on the GPU, with no host sync: the same arithmetic as transformers' processors.

`plan_from_hf` reads the processors and stopping criteria that `generate()` prepared (so every default, pipeline
setting and generation_config merge is transformers' own) and returns a `SamplingPlan`, or None when something is
asked for that the fast path does not implement (the caller then runs transformers' loop). The plan's static part
(which steps run, top-k) keys the captured graph; its values (temperature, top-p, penalty, ...) live in device
tensors, so a new temperature is a copy into a buffer, not a recapture.

Order, as in `GenerationMixin._get_logits_processor`: repetition penalty, min length (EOS suppressed), temperature,
top-k, top-p; then argmax (greedy) or an exponential race, argmax(p / Exp(1)), which draws from softmax(p) exactly
like `torch.multinomial` but needs no sync.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc


class StepKey(NamedTuple):
    """The static part of a plan: which processors run (a captured graph is specific to it)."""

    do_sample: bool
    top_k: int
    top_p: bool
    temperature: bool
    penalty: bool
    min_length: bool
    pad_finished: bool


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    do_sample: bool = False
    top_k: int = 0  # 0: off
    top_p: float | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    # prompt positions the penalty ignores, as the processor holds them: None (transformers < 5.23 penalises
    # left padding too), an int (the first n), or a per-row tensor (>= 5.23: each row's left padding)
    penalty_ignore: object = dataclasses.field(default=None, compare=False)
    min_length: int = 0  # EOS is suppressed while the sequence (prompt + new) is shorter than this
    min_new_tokens: int = 0  # ... or while fewer new tokens than this were generated
    max_length: int = 0  # prompt + new tokens
    eos: tuple[int, ...] = ()
    pad: int = 0
    pad_finished: bool = False  # transformers writes `pad` after a row's EOS only when an EOS criterion exists
    stop_strings: object | None = None  # a StopStringCriteria, run between steps (tensor ops, no sync)

    @property
    def key(self) -> StepKey:
        """What changes the captured graph; everything else is a buffer value."""
        return StepKey(self.do_sample, self.top_k, self.top_p is not None, self.temperature is not None,
                       self.repetition_penalty is not None, bool(self.min_length or self.min_new_tokens),
                       self.pad_finished)


def plan_from_hf(logits_processor, stopping_criteria, generation_config) -> tuple[SamplingPlan | None, str]:
    """(plan, "") or (None, reason) from what `generate()` prepared."""
    kw: dict = {"do_sample": bool(generation_config.do_sample)}
    expected = [lp.RepetitionPenaltyLogitsProcessor, lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor,
                lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper]
    position = -1
    for proc in logits_processor or []:
        if type(proc) not in expected:
            return None, f"logits processor {type(proc).__name__}"
        if expected.index(type(proc)) <= position:
            return None, "logits processors in an unusual order"
        position = expected.index(type(proc))
        if isinstance(proc, lp.RepetitionPenaltyLogitsProcessor):
            kw["repetition_penalty"] = float(proc.penalty)
            kw["penalty_ignore"] = getattr(proc, "prompt_ignore_length", None)
        elif isinstance(proc, lp.MinLengthLogitsProcessor):
            kw["min_length"] = int(proc.min_length)
        elif isinstance(proc, lp.MinNewTokensLengthLogitsProcessor):
            kw["min_new_tokens"] = int(proc.min_new_tokens)
        elif isinstance(proc, lp.TemperatureLogitsWarper):
            kw["temperature"] = float(proc.temperature)
        elif isinstance(proc, lp.TopKLogitsWarper):
            if proc.filter_value != -float("inf"):
                return None, "top-k with a custom filter value"
            kw["top_k"] = int(proc.top_k)
        elif isinstance(proc, lp.TopPLogitsWarper):
            if proc.filter_value != -float("inf") or proc.min_tokens_to_keep != 1:
                return None, "top-p with a custom filter value or min_tokens_to_keep"
            kw["top_p"] = float(proc.top_p)
    eos: list[int] = []
    for crit in stopping_criteria or []:
        if isinstance(crit, sc.MaxLengthCriteria):
            kw["max_length"] = int(crit.max_length)
        elif isinstance(crit, sc.EosTokenCriteria):
            eos = [int(t) for t in torch.as_tensor(crit.eos_token_id).flatten().tolist()]
            kw["pad_finished"] = True
        elif isinstance(crit, sc.StopStringCriteria):
            kw["stop_strings"] = crit
        else:
            return None, f"stopping criterion {type(crit).__name__}"
    if not kw.get("max_length"):
        return None, "no max_length"
    if kw.get("min_length") or kw.get("min_new_tokens"):
        eos_tensor = generation_config._eos_token_tensor
        eos = eos or ([int(t) for t in eos_tensor.flatten().tolist()] if eos_tensor is not None else [])
    pad = generation_config._pad_token_tensor
    kw["pad"] = int(pad) if pad is not None else 0
    kw["eos"] = tuple(eos)
    return SamplingPlan(**kw), ""


# --- the arithmetic; each function mirrors one transformers processor ---------------------------------------------

def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor: tokens already in the row are divided (positive) or multiplied (negative)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def suppress_eos(logits: torch.Tensor, eos_mask: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """MinLength / MinNewTokens: EOS logits are -inf while `active` (a 0-d bool tensor)."""
    return logits.masked_fill(eos_mask & active, -float("inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p; the top token always stays."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -float("inf"))


def choose(logits: torch.Tensor, do_sample: bool) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1)


def process(logits: torch.Tensor, st, key: StepKey) -> torch.Tensor:
    """Apply the plan's processors to float32 logits [B, V]; `st` holds the buffers (see session.State)."""
    if key.penalty:
        logits = repetition_penalty(logits, st.seen, st.penalty)
    if key.min_length:
        n_new = st.slot - st.prompt_len + 1  # tokens generated before this one
        active = (n_new < st.min_new) | (st.prompt_len + n_new < st.min_len)
        logits = suppress_eos(logits, st.eos_mask, active)
    if not key.do_sample:
        return logits
    if key.temperature:
        logits = logits / st.temperature
    if key.top_k:
        logits = top_k_filter(logits, key.top_k)
    if key.top_p:
        logits = top_p_filter(logits, st.top_p)
    return logits
