"""Greedy agreement of a model with a reference on held-out prompts."""
from __future__ import annotations

import torch

from .corpus import token_stream
from .records import make_record, model_name


def heldout_prompts(tokenizer, n_prompts: int, prompt_len: int, max_tokens: int = 262144) -> torch.Tensor:
    """``n_prompts`` equal-length prompts, evenly spaced over the held-out stream (equal lengths: no padding)."""
    ids = token_stream(tokenizer, "heldout", max_tokens)
    starts = torch.linspace(0, len(ids) - prompt_len - 1, n_prompts).long()
    return torch.stack([ids[s : s + prompt_len] for s in starts])


@torch.no_grad()
def greedy_generate(model, tokenizer, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """Greedy continuation via ``model.generate`` (so generate-patching plugins are measured); new tokens only."""
    input_ids = input_ids.to(model.device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    out = out.sequences if hasattr(out, "sequences") else out
    cont = out[:, input_ids.shape[1] :].cpu()
    # generate stops early when every row hit EOS: pad to the requested length
    pad = torch.full((cont.shape[0], new_tokens - cont.shape[1]), tokenizer.pad_token_id, dtype=cont.dtype)
    return torch.cat([cont, pad], dim=1)


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, positions: slice) -> torch.Tensor:
    logits = model(input_ids=ids.to(model.device), use_cache=False).logits[:, positions]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def greedy_agreement(model, reference, tokenizer, *, n_prompts: int = 32, prompt_len: int = 64,
                     new_tokens: int = 32, batch_size: int = 8, spec: str | None = None) -> list[dict]:
    """How closely ``model`` follows ``reference`` when both decode greedily.

    Records: fraction of identical continuations; mean position of the first differing token (``new_tokens``
    when identical); and, teacher-forced on the reference continuation, mean KL(reference || model) of the
    next-token distributions and top-1 agreement. Positions after the reference's EOS are ignored.
    """
    prompts = heldout_prompts(tokenizer, n_prompts, prompt_len)
    identical, first_div, kl_sum, top1_sum, n_pos = 0, 0, 0.0, 0, 0
    for batch in prompts.split(batch_size):
        ref_cont = greedy_generate(reference, tokenizer, batch, new_tokens)
        cont = greedy_generate(model, tokenizer, batch, new_tokens)
        # valid: up to and including the reference's first EOS
        is_eos = (ref_cont == tokenizer.eos_token_id).long()
        valid = (is_eos.cumsum(1) - is_eos) == 0
        differs = (ref_cont != cont) & valid
        identical += int((~differs.any(1)).sum())
        first_div += int(torch.where(differs.any(1), differs.float().argmax(1), torch.tensor(new_tokens)).sum())

        seq = torch.cat([batch, ref_cont], dim=1)
        predicting = slice(prompt_len - 1, seq.shape[1] - 1)  # positions whose next token is a continuation token
        ref_lp, lp = _logprobs(reference, seq, predicting), _logprobs(model, seq, predicting)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
        kl_sum += float(kl[valid].sum())
        top1_sum += int((ref_lp.argmax(-1) == lp.argmax(-1))[valid].sum())
        n_pos += int(valid.sum())

    params = {"reference": model_name(reference), "n_prompts": n_prompts,
              "prompt_len": prompt_len, "new_tokens": new_tokens, "split": "heldout"}
    values = {
        "greedy_identical_fraction": identical / n_prompts,
        "greedy_first_divergence_mean": first_div / n_prompts,
        "teacher_forced_kl_mean": kl_sum / n_pos,
        "teacher_forced_top1_agreement": top1_sum / n_pos,
    }
    return [make_record(model, metric, value, spec=spec, params=params) for metric, value in values.items()]
