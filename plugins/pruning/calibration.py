"""Calibration for pruning: token batches from the reference corpus, and layer-by-layer input statistics.

Layers are calibrated in order, each on the outputs of the already pruned layers before it (as in the Wanda and
SparseGPT reference code): for layer i the model runs up to layer i (a hook stops the forward there), the inputs of
its linear layers are accumulated, the layer is pruned, then layer i+1 follows."""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from hf_accel.errors import AccelError


class _Stop(Exception):
    pass


def load_tokenizer(model, tokenizer: str | None):
    """The tokenizer named by the option, else the model's own (a `reference/<name>` model maps to its folder)."""
    from transformers import AutoTokenizer

    name = tokenizer or getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not name:
        raise AccelError("pruning needs a tokenizer for its calibration text, and the model does not name one; "
                         "pass tokenizer='<path or hub id>' (e.g. prune(tokenizer=reference/tiny))")
    name = str(name)
    if name.startswith("reference/"):
        from hf_accel.quality.reference import reference_path

        name = str(reference_path(name.split("/", 1)[1]))
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise AccelError(f"cannot load the calibration tokenizer {name!r} ({type(e).__name__}); pass tokenizer='<path "
                         "or hub id>' (accepted: a local folder or a reference model name like reference/tiny)") from e


_STREAMS: dict[tuple, torch.Tensor] = {}  # tokenizing the corpus costs seconds on CPU: once per process


def calibration_ids(model, tokenizer, samples: int, seq_len: int, split: str = "train") -> torch.Tensor:
    """(samples, seq_len) token ids: consecutive windows of the reference corpus' `split` (files joined by EOS)."""
    from hf_accel.quality.corpus import token_stream

    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len) or seq_len))
    key = (str(getattr(tokenizer, "name_or_path", id(tokenizer))), len(tokenizer), split)
    if key not in _STREAMS or len(_STREAMS[key]) < samples * seq_len:
        _STREAMS[key] = token_stream(tokenizer, split, samples * seq_len)
    ids = _STREAMS[key][: samples * seq_len]
    if len(ids) < samples * seq_len:
        raise AccelError(f"the reference corpus has only {len(ids)} tokens; ask for fewer samples x seq_len")
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab and int(ids.max()) >= vocab:
        ids = ids % vocab  # a model with a smaller vocabulary than the tokenizer (random-weight test models)
    return ids.reshape(samples, seq_len)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's repeated blocks: the longest ModuleList holding linear layers."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and any(
            hasattr(m, "in_features") for m in module[0].modules()  # nn.Linear, or already pruned/packed
        ):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise AccelError(f"{type(model).__name__} has no list of decoder layers with linear layers to prune")
    return best


def run_until(model: nn.Module, layer: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    """Forward the calibration batches, stopping each one when `layer` has run (hooks on it collect inputs)."""
    def stop(*_):
        raise _Stop

    handle = layer.register_forward_hook(stop)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()


class InputStats:
    """Accumulates what a pruning method needs from a linear layer's inputs: per-column squared norms (Wanda) and,
    if `hessian`, H = 2/n sum x x^T (SparseGPT), in float32."""

    def __init__(self, in_features: int, device, hessian: bool):
        self.n = 0
        self.sq = torch.zeros(in_features, device=device)
        self.H = torch.zeros(in_features, in_features, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.sq += x.pow(2).sum(0)
        if self.H is not None:
            self.H *= self.n / (self.n + m)
            x = x * (2.0 / (self.n + m)) ** 0.5
            self.H += x.T @ x
        self.n += m

    @property
    def act_norm(self) -> torch.Tensor:
        return self.sq.sqrt()


def collect(model: nn.Module, layer: nn.Module, linears: dict[str, nn.Module], ids: torch.Tensor,
            batch_size: int, hessian: bool) -> dict[str, InputStats]:
    """Input statistics of each of `linears` (inside `layer`) over the calibration batches."""
    stats, handles = {}, []
    for name, lin in linears.items():
        stats[name] = s = InputStats(lin.in_features, lin.weight.device, hessian)
        handles.append(lin.register_forward_pre_hook(lambda m, args, s=s: s.add(args[0].detach())))
    try:
        run_until(model, layer, ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    return stats


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True) -> Iterator:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)
