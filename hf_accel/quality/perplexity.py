"""Held-out perplexity (sliding window) and the unigram baseline it must beat."""
from __future__ import annotations

import math

import torch

from .corpus import token_stream
from .records import make_record


@torch.no_grad()
def sliding_window_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of scored tokens over the 1-D ``ids``.

    Windows of ``max_length`` advance by ``stride``; each token is scored once, with up to
    ``max_length - stride`` tokens of extra context (the HF "perplexity of fixed-length models" recipe).
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride={stride}, max_length={max_length}")
    nll, count, scored_until = 0.0, 0, 1  # the first token has no context and is never scored
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end].to(model.device)[None]
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, window[0, 1:, None])[:, 0]
        # Targets not scored by an earlier window are the last `new` ones (with stride == max_length the
        # window's first token has no context inside it and stays unscored, as in the HF recipe).
        new = min(end - scored_until, len(logprobs))
        nll -= logprobs[-new:].sum().item()
        count += new
        scored_until = end
        if end == len(ids):
            break
    return nll, count


def perplexity(model, tokenizer, *, max_length: int | None = None, stride: int | None = None,
               max_tokens: int = 32768, spec: str | None = None) -> dict:
    """Perplexity on the first ``max_tokens`` of the held-out split (files joined by EOS)."""
    max_length = max_length or int(model.config.max_position_embeddings)
    stride = stride or max_length // 2
    ids = token_stream(tokenizer, "heldout", max_tokens)
    was_training = model.training
    model.eval()
    nll, count = sliding_window_nll(model, ids, max_length, stride)
    model.train(was_training)
    params = {"max_length": max_length, "stride": stride, "tokens": count, "split": "heldout"}
    return make_record(model, "heldout_perplexity", math.exp(nll / count), spec=spec, params=params)


def perplexity_change(model, reference, tokenizer, *, spec: str | None = None, **kwargs) -> list[dict]:
    """[reference's perplexity, ``model``'s, relative change model/reference - 1], on the same tokens.

    ``by_metric`` of the result gives ``model``'s perplexity (the later record wins) and the change.
    """
    ref = perplexity(reference, tokenizer, **kwargs)
    ours = perplexity(model, tokenizer, spec=spec, **kwargs)
    change = ours["value"] / ref["value"] - 1.0
    params = {**ours["params"], "reference": ref["model"], "reference_perplexity": ref["value"]}
    return [ref, ours, make_record(model, "heldout_perplexity_rel_change", change, spec=spec, params=params)]


def unigram_perplexity(tokenizer, *, max_train_tokens: int | None = None, max_tokens: int = 32768) -> dict:
    """Perplexity of a unigram model (add-one smoothed train-split token frequencies) on the held-out tokens.

    The floor any trained model must beat by far; evaluated on the same tokens as :func:`perplexity`.
    """
    train = token_stream(tokenizer, "train", max_train_tokens)
    counts = torch.bincount(train, minlength=len(tokenizer)).double() + 1.0
    logp = torch.log(counts / counts.sum())
    heldout = token_stream(tokenizer, "heldout", max_tokens)[1:]  # same targets as perplexity()
    value = math.exp(-logp[heldout].mean().item())
    params = {"tokenizer": str(getattr(tokenizer, "name_or_path", "")), "train_tokens": len(train),
              "tokens": len(heldout), "split": "heldout", "smoothing": "add-one"}
    return make_record("unigram", "unigram_heldout_perplexity", value, params=params)
