"""Quick, honest measurements for the CLI and the demo: weight bytes, decode speed, greedy agreement.

These time the model as the user will call it (`model.generate`), on whatever device it is on. The benchmark
scripts in `scripts/` are the reference for published numbers; these give a first look at any model and spec."""

from __future__ import annotations

import statistics
import time

import torch


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and persistent buffers, as stored (int8 counts one byte)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tokens_per_s(model, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3, warmup: int = 1) -> float:
    """Decode speed as (t(new_tokens) - t(1)) / (new_tokens - 1): the prompt's prefill cost cancels out."""
    device = input_ids.device
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, pad_token_id=model.generation_config.pad_token_id or 0)

    def timed(n):
        _sync(device)
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=n, **{**kwargs, "min_new_tokens": n})
        _sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        timed(new_tokens)
    long = statistics.median(timed(new_tokens) for _ in range(repeats))
    short = statistics.median(timed(1) for _ in range(repeats))
    return (new_tokens - 1) / max(long - short, 1e-9) * input_ids.shape[0]


@torch.inference_mode()
def greedy_agreement(reference, candidate, prompts: list[torch.Tensor], new_tokens: int = 16) -> float:
    """Fraction of prompts whose greedy continuation is identical."""
    same = 0
    for ids in prompts:
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        same += torch.equal(reference.generate(ids, **kwargs), candidate.generate(ids, **kwargs))
    return same / max(len(prompts), 1)
