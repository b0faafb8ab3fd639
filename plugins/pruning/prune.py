"""`prune`: unstructured and N:M weight pruning by magnitude, Wanda or SparseGPT, calibrated on the reference corpus.

    model = AutoModelForCausalLM.from_pretrained(path, accel="prune(method=wanda, sparsity=0.5)")
    model = AutoModelForCausalLM.from_pretrained(path, accel="prune(method=sparsegpt, pattern=2:4)")

Zeros alone buy nothing, so 2:4 results are stored compressed (`Sparse24Linear`: 0.56x the bytes) and run on CUDA
through the Triton 2:4 kernel for small inputs (decode: <= `kernel_rows` rows) and on the sparse tensor cores above;
unstructured and 4:8 results stay dense `nn.Linear` layers with zeros (they save and load as plain weights). Every
pruned layer is swapped in through the Patcher: a failed spec restores the originals; after a successful apply the
pruning is not undoable (the dense weights are released)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hf_accel.errors import OptionError
from hf_accel.plugin import Family, ModelKind, Plugin

from . import calibration as cal
from .methods import parse_pattern, score_mask, sparsegpt
from .sparse24 import Sparse24Linear

PATTERNS = ("unstructured", "2:4", "4:8")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], p) for p in skip)


def _dense_linear(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


@dataclass
class Prune(Plugin):
    """Weight pruning (magnitude / Wanda / SparseGPT; unstructured, 2:4, 4:8); 2:4 runs on sparse tensor cores."""

    name = "prune"
    family = Family.PRUNING
    supported_kinds = frozenset({ModelKind.CAUSAL_LM, ModelKind.TRANSFORMERS})
    conflicts_with = ("shrink",)
    rewrites_weights = True

    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float = 0.5  # unstructured only; N:M patterns fix it at 1 - N/M
    pattern: Literal["unstructured", "2:4", "4:8"] = "unstructured"
    samples: int = 64  # calibration sequences from the reference corpus' train split
    seq_len: int = 512
    batch_size: int = 8
    tokenizer: str | None = None  # calibration tokenizer; default: the model's own
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT Hessian dampening (fraction of the mean diagonal)
    storage: Literal["auto", "dense", "sparse24"] = "auto"  # auto: compressed 2:4 for pattern=2:4, dense otherwise
    dense_below: int = 0  # Sparse24Linear: inputs with fewer rows use a resident dense copy (0: always sparse)
    kernel_rows: int = 32  # Sparse24Linear: inputs with at most this many rows run the Triton 2:4 kernel on CUDA
    skip: tuple[str, ...] = ("lm_head",)
    progress: bool = True

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"plugin 'prune': sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern != "unstructured" and self.sparsity != 0.5 and self.sparsity != 1 - self.nm[0] / self.nm[1]:
            raise OptionError(f"plugin 'prune': pattern={self.pattern} fixes sparsity at {1 - self.nm[0] / self.nm[1]}; "
                              f"drop sparsity= or use pattern=unstructured")
        if self.kernel_rows < 0 or self.dense_below < 0:
            raise OptionError("plugin 'prune': kernel_rows and dense_below must be >= 0")
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1 or self.blocksize < 8:
            raise OptionError("plugin 'prune': samples, batch_size >= 1, seq_len >= 2 and blocksize >= 8 are required")
        if self.storage == "sparse24" and self.pattern != "2:4":
            raise OptionError(f"plugin 'prune': storage=sparse24 needs pattern=2:4, got pattern={self.pattern}; "
                              "accepted: storage=auto or dense")
        if self.blocksize % (self.nm[1] if self.nm else 1):
            raise OptionError(f"plugin 'prune': blocksize must be a multiple of {self.nm[1]} for pattern={self.pattern}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def compressed(self) -> bool:
        return self.pattern == "2:4" and self.storage != "dense"

    def targets(self, layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
        out = {}
        for name, m in layer.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if type(m) is nn.Linear and not _skipped(full, self.skip):
                if self.nm and m.in_features % (8 if self.compressed else self.nm[1]):
                    raise OptionError(f"plugin 'prune': {full} has in_features={m.in_features}, not divisible by "
                                      f"{8 if self.compressed else self.nm[1]} as pattern={self.pattern} needs; "
                                      f"skip it (skip=[...]) or use pattern=unstructured")
                out[name] = m
        return out

    def apply(self, model, patcher):
        prefix, layers = cal.decoder_layers(model)
        per_layer = [self.targets(layer, f"{prefix}.{i}") for i, layer in enumerate(layers)]
        if not any(per_layer):
            raise OptionError(f"plugin 'prune' found no linear layer to prune in {type(model).__name__} "
                              f"(skip={list(self.skip)})")
        ids = None
        if self.method != "magnitude":
            ids = cal.calibration_ids(model, cal.load_tokenizer(model, self.tokenizer), self.samples, self.seq_len)
        bar = cal.progress(range(len(layers)), f"prune {self.method} {self.pattern}", enabled=self.progress)
        for i in bar:
            layer, linears = layers[i], per_layer[i]
            if not linears:
                continue
            stats = None
            if ids is not None:
                stats = cal.collect(model, layer, linears, ids, self.batch_size, hessian=self.method == "sparsegpt")
            for names in self._groups(linears, stats):
                self._prune_group(model, patcher, f"{prefix}.{i}", layer, names, linears, stats)

    def _groups(self, linears, stats) -> list[list[str]]:
        """Linears that read the same input (q/k/v, gate/up) share one Hessian: SparseGPT runs once on their rows."""
        if stats is None or self.method != "sparsegpt":
            return [[n] for n in linears]
        groups: list[list[str]] = []
        for name in linears:
            for g in groups:
                if stats[g[0]].n == stats[name].n and torch.equal(stats[g[0]].sq, stats[name].sq):
                    g.append(name)
                    break
            else:
                groups.append([name])
        return groups

    @torch.no_grad()
    def _prune_group(self, model, patcher, prefix, layer, names, linears, stats):
        weights = [linears[n].weight.float() for n in names]
        if self.method == "sparsegpt":
            w, keep = sparsegpt(torch.cat(weights), stats[names[0]].H, self.sparsity, self.nm, self.blocksize,
                                self.percdamp)
            stats[names[0]].H = None
            parts = list(zip(w.split([x.shape[0] for x in weights]), keep.split([x.shape[0] for x in weights])))
        else:
            parts = [score_mask(wt, self.sparsity, self.nm, None if stats is None else stats[n].act_norm)
                     for n, wt in zip(names, weights)]
        for name, (w, keep) in zip(names, parts):
            lin = linears[name]
            w = w.to(lin.weight.dtype)
            if self.compressed:
                new = Sparse24Linear.from_dense(w, keep, lin.bias, self.dense_below, self.kernel_rows)
            else:
                new = _dense_linear(lin, w * keep)
            patcher.swap_module(model, f"{prefix}.{name}", new, rewrites_weights=True)

    def prepare_for_loading(self, model, patcher):
        """Dense storage loads as plain weights; 2:4 compressed storage needs the Sparse24Linear skeletons."""
        if not self.compressed:
            return
        prefix, layers = cal.decoder_layers(model)
        for i, layer in enumerate(layers):
            for name, lin in self.targets(layer, f"{prefix}.{i}").items():
                skeleton = Sparse24Linear.skeleton_of(lin, self.dense_below, self.kernel_rows)
                patcher.swap_module(model, f"{prefix}.{i}.{name}", skeleton, rewrites_weights=True)

    def card_metadata(self, model):
        total = zeros = 0
        for m in model.modules():
            if isinstance(m, Sparse24Linear):
                total += m.in_features * m.out_features
                zeros += m.in_features * m.out_features // 2
        prefix, layers = cal.decoder_layers(model)
        for i, layer in enumerate(layers):
            for lin in self.targets(layer, f"{prefix}.{i}").values():
                total += lin.weight.numel()
                zeros += int((lin.weight == 0).sum())
        return {"pruned_weights": zeros, "prunable_weights": total,
                "sparsity": round(zeros / max(total, 1), 4), "storage": "2:4 compressed" if self.compressed else "dense"}
