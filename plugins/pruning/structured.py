"""`shrink`: structured pruning that makes the model smaller. Whole MLP channels and whole KV groups (a KV head with
the query heads that read it) are removed, the same number in every layer, so the result is an ordinary, smaller
checkpoint of the same class: `intermediate_size`, `num_key_value_heads` and `num_attention_heads` shrink in the
config (`head_dim` is written out), and plain transformers loads it (`save_plain`). Per-layer sizes are kept equal on
purpose: transformers' Llama/Qwen/Mistral configs have one size for all layers, so non-uniform layers could not
reload without custom code.

Scores: `activation` (Wanda-style: |W| x input-activation norm, summed per channel / group) or `lora`
(LoRAPrune, arXiv:2305.18403: the LoRA-projected gradient estimates dL/dW without full gradients; importance
|W * G| per channel / group). Accuracy is recovered with `recover_lora` (peft LoRA on the reference corpus, merged).

    model = AutoModelForCausalLM.from_pretrained(path, accel="shrink(ratio=0.25)")
    recover_lora(model, tokenizer, steps=200); save_plain(model, "out")  # a normal, smaller checkpoint + card
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from hf_accel.errors import OptionError, UnsupportedModelError
from hf_accel.plugin import Family, ModelKind, Plugin

from . import calibration as cal


def _parts(layer: nn.Module):
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    ok_attn = attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ok_mlp = mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
    return (attn if ok_attn else None), (mlp if ok_mlp else None)


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def group_sizes(config) -> tuple[int, int, int]:
    """(query heads per KV group, KV heads, head_dim)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads // kv, kv, head_dim


# -- scores -------------------------------------------------------------------------------------------------------
def _group_reduce(per_col: torch.Tensor, q_per_kv: int, head_dim: int) -> torch.Tensor:
    return per_col.reshape(-1, q_per_kv * head_dim).sum(-1)  # o_proj columns -> KV groups


@torch.no_grad()
def activation_scores(model, ids: torch.Tensor, batch_size: int = 8, progress: bool = True):
    """Per layer: (MLP channel scores, KV group scores), each sum |W| x ||x|| over the weights a unit owns on the
    input side of down_proj / o_proj (the Wanda score of those columns)."""
    prefix, layers = cal.decoder_layers(model)
    q_per_kv, _, head_dim = group_sizes(model.config)
    out = []
    for layer in cal.progress(layers, "shrink: activation scores", enabled=progress):
        attn, mlp = _parts(layer)
        lins = {k: v for k, v in (("o", attn and attn.o_proj), ("down", mlp and mlp.down_proj)) if v is not None}
        stats = cal.collect(model, layer, lins, ids, batch_size, hessian=False)
        mlp_s = (mlp.down_proj.weight.abs().float().sum(0) * stats["down"].act_norm) if mlp else None
        attn_s = None
        if attn is not None:
            col = attn.o_proj.weight.abs().float().sum(0) * stats["o"].act_norm
            attn_s = _group_reduce(col, q_per_kv, head_dim)
        out.append((mlp_s, attn_s))
    return out


def lora_scores(model, ids: torch.Tensor, batch_size: int = 4, r: int = 8, progress: bool = True):
    """LoRAPrune importance: with a LoRA (B A) on every target linear, the gradient of W is estimated from the LoRA
    gradients, G ≈ dL/dB A + B dL/dA (B starts at zero, so the first term carries it); importance = |(W + BA) * G|
    summed over the weights of each MLP channel (gate/up rows, down column) and each KV group (q/k/v rows, o
    columns), accumulated over the calibration batches."""
    import peft

    prefix, layers = cal.decoder_layers(model)
    q_per_kv, kv, head_dim = group_sizes(model.config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    was_training = model.training
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0,
                                                    init_lora_weights=True))
    pm.train()
    acc: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    lora_mods = {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    try:
        for batch in cal.progress(ids.split(batch_size), "shrink: LoRA-gradient scores", enabled=progress):
            pm.zero_grad(set_to_none=True)
            batch = batch.to(device)
            loss = pm(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            with torch.no_grad():
                for name, m in lora_mods.items():
                    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                    G = B.grad.float() @ A.float() + B.float() @ A.grad.float()
                    W = m.base_layer.weight.float() + B.float() @ A.float() * m.scaling["default"]
                    imp = (W * G).abs()
                    acc[name] = acc.get(name, 0) + imp
    finally:
        base = pm.unload()  # removes the LoRA layers without merging (B is zero-initialised and never stepped)
        for n, p in base.named_parameters():
            p.requires_grad_(requires.get(n, p.requires_grad))
        base.train(was_training)
        base.zero_grad(set_to_none=True)
    out = []
    for i, layer in enumerate(layers):
        def get(kind):
            want = f"{prefix}.{i}.{kind}"
            return next(v for k, v in acc.items() if k == want or k.endswith("." + want))
        attn, mlp = _parts(layer)
        mlp_s = attn_s = None
        if mlp is not None:
            mlp_s = get("mlp.gate_proj").sum(1) + get("mlp.up_proj").sum(1) + get("mlp.down_proj").sum(0)
        if attn is not None:
            q = get("self_attn.q_proj").sum(1).reshape(kv, -1).sum(1)
            k = get("self_attn.k_proj").sum(1).reshape(kv, -1).sum(1)
            v = get("self_attn.v_proj").sum(1).reshape(kv, -1).sum(1)
            o = _group_reduce(get("self_attn.o_proj").sum(0), q_per_kv, head_dim)
            attn_s = q + k + v + o
        out.append((mlp_s, attn_s))
    return out


def weight_scores(model):
    """Data-free scores (weight norms): for benchmarks on random weights, where no score means anything."""
    _, layers = cal.decoder_layers(model)
    q_per_kv, _, head_dim = group_sizes(model.config)
    out = []
    for layer in layers:
        attn, mlp = _parts(layer)
        out.append((mlp.down_proj.weight.float().norm(dim=0) if mlp else None,
                    _group_reduce(attn.o_proj.weight.float().norm(dim=0), q_per_kv, head_dim) if attn else None))
    return out


# -- the cut --------------------------------------------------------------------------------------------------------
def plan(config, ratio: float, target: str) -> tuple[int, int]:
    """(MLP channels kept, KV groups kept) per layer for removing `ratio` of each targeted unit.

    MLP channels are rounded to a multiple of 8. transformers' configs require hidden_size % num_attention_heads
    == 0, so the KV-group count is the allowed one closest to the request (ties keep more): on the `base`
    reference (12 heads / 4 KV) 25% becomes 0% and 40% becomes 50%; on the 8B shape (32 / 8) 25% becomes 0% and 40% becomes 50%."""
    q_per_kv, kv, _ = group_sizes(config)
    inter = config.intermediate_size
    keep_mlp = inter if target == "attention" else max(8, int(round(inter * (1 - ratio) / 8)) * 8)
    if target == "mlp":
        return keep_mlp, kv
    want = kv * (1 - ratio)
    allowed = [k for k in range(1, kv + 1) if config.hidden_size % (k * q_per_kv) == 0]
    keep_kv = min(allowed, key=lambda k: (abs(k - want), -k))
    return keep_mlp, keep_kv


@torch.no_grad()
def shrink_model(model, scores, keep_mlp: int, keep_kv: int, patcher=None) -> dict:
    """Keep the `keep_mlp` best MLP channels and `keep_kv` best KV groups of every layer (by `scores`), rebuild the
    linears at the smaller sizes and update the config. With a patcher, every swap and config edit is recorded."""
    prefix, layers = cal.decoder_layers(model)
    config = model.config
    q_per_kv, kv, head_dim = group_sizes(config)
    before = sum(p.numel() for p in model.parameters())

    def swap(name, new):
        if patcher is not None:
            patcher.swap_module(model, name, new, rewrites_weights=True)
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)

    for i, (layer, (mlp_s, attn_s)) in enumerate(zip(layers, scores)):
        attn, mlp = _parts(layer)
        base = f"{prefix}.{i}"
        if mlp is not None and keep_mlp < mlp.down_proj.in_features:
            idx = mlp_s.topk(keep_mlp).indices.sort().values.to(mlp.down_proj.weight.device)
            swap(f"{base}.mlp.gate_proj", _slice_linear(mlp.gate_proj, rows=idx))
            swap(f"{base}.mlp.up_proj", _slice_linear(mlp.up_proj, rows=idx))
            swap(f"{base}.mlp.down_proj", _slice_linear(mlp.down_proj, cols=idx))
        if attn is not None and keep_kv < kv:
            g = attn_s.topk(keep_kv).indices.sort().values.to(attn.o_proj.weight.device)
            kv_rows = (g[:, None] * head_dim + torch.arange(head_dim, device=g.device)).flatten()
            q_heads = (g[:, None] * q_per_kv + torch.arange(q_per_kv, device=g.device)).flatten()
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim, device=g.device)).flatten()
            swap(f"{base}.self_attn.q_proj", _slice_linear(attn.q_proj, rows=q_rows))
            swap(f"{base}.self_attn.k_proj", _slice_linear(attn.k_proj, rows=kv_rows))
            swap(f"{base}.self_attn.v_proj", _slice_linear(attn.v_proj, rows=kv_rows))
            swap(f"{base}.self_attn.o_proj", _slice_linear(attn.o_proj, cols=q_rows))
    new_values = {"intermediate_size": keep_mlp if any(m is not None for m, _ in scores) else config.intermediate_size,
                  "num_key_value_heads": keep_kv, "num_attention_heads": keep_kv * q_per_kv, "head_dim": head_dim}
    for key, value in new_values.items():
        if patcher is not None:
            patcher.set_attr(config, key, value)
        else:
            setattr(config, key, value)
    after = sum(p.numel() for p in model.parameters())
    return {"params_before": before, "params_after": after, **new_values}


@dataclass
class Shrink(Plugin):
    """Structured pruning: removes MLP channels and KV groups (activation or LoRA-gradient scores); config shrinks."""

    name = "shrink"
    family = Family.PRUNING
    supported_kinds = frozenset({ModelKind.CAUSAL_LM})
    conflicts_with = ("prune",)
    rewrites_weights = True

    ratio: float = 0.25  # fraction of MLP channels and of KV groups removed in every layer
    target: Literal["both", "mlp", "attention"] = "both"
    score: Literal["activation", "lora", "weight"] = "activation"
    samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    tokenizer: str | None = None
    progress: bool = True

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise OptionError(f"plugin 'shrink': ratio must be in (0, 1), got {self.ratio}")
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise OptionError("plugin 'shrink': samples, batch_size >= 1 and seq_len >= 2 are required")

    def check(self, model):
        super().check(model)
        try:
            _, layers = cal.decoder_layers(model)
            attn, mlp = _parts(layers[0])
        except Exception:
            attn = mlp = None
        if attn is None or mlp is None or not hasattr(model.config, "intermediate_size"):
            raise UnsupportedModelError(
                f"plugin 'shrink' needs Llama-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj and "
                f"config.intermediate_size); {type(model).__name__} does not have them. Accepted: Llama, Mistral, "
                "Qwen2, Gemma and other models with that layout")

    def apply(self, model, patcher):
        keep_mlp, keep_kv = plan(model.config, self.ratio, self.target)
        if self.score == "weight":
            scores = weight_scores(model)
        else:
            ids = cal.calibration_ids(model, cal.load_tokenizer(model, self.tokenizer), self.samples, self.seq_len)
            fn = activation_scores if self.score == "activation" else lora_scores
            scores = fn(model, ids, self.batch_size, progress=self.progress)
        if self.target == "attention":
            scores = [(None, a) for _, a in scores]
        if self.target == "mlp":
            scores = [(m, None) for m, _ in scores]
        self._facts = shrink_model(model, scores, keep_mlp, keep_kv, patcher)

    def prepare_for_loading(self, model, patcher):
        """The saved config already has the smaller sizes: the skeleton transformers builds is the pruned one."""

    def card_metadata(self, model):
        return {k: v for k, v in getattr(self, "_facts", {}).items()}


# -- recovery and export --------------------------------------------------------------------------------------------
def recover_lora(model, tokenizer, *, steps: int = 100, r: int = 8, lr: float = 3e-4, seq_len: int = 256,
                 batch_size: int = 4, progress: bool = True, seed: int = 0) -> dict:
    """Recovery fine-tuning: peft LoRA on every attention/MLP linear, trained on the reference corpus' train split
    (windows after the calibration ones), then merged into the weights. Returns {first/last loss, steps, ...}."""
    import peft

    torch.manual_seed(seed)
    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len)))
    ids = cal.calibration_ids(model, tokenizer, steps * batch_size + 64, seq_len)[64:]  # skip calibration windows
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    pm.train()
    losses = []
    for step, batch in enumerate(cal.progress(ids.split(batch_size)[:steps], "recover (LoRA)", total=steps,
                                              enabled=progress)):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = pm(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    merged = pm.merge_and_unload()
    merged.eval()
    assert merged is model
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "r": r, "lr": lr, "seq_len": seq_len, "batch_size": batch_size,
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


def save_plain(model, directory, *, card: dict | None = None) -> Path:
    """Save a shrunk model as an ordinary transformers checkpoint (no hf_accel needed to load it) with a card."""
    from hf_accel.apply import STATE_ATTR

    directory = Path(directory)
    state = model.__dict__.pop(STATE_ATTR, None)
    qc = getattr(model.config, "quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    quantized = getattr(model, "is_quantized", False)
    try:
        if qc is not None:
            del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        model.save_pretrained(directory)
    finally:
        if state is not None:
            setattr(model, STATE_ATTR, state)
        if qc is not None:
            model.config.quantization_config = qc
        model.hf_quantizer, model.is_quantized = quantizer, quantized
    cfg = model.config
    facts = {"intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
             "num_key_value_heads": getattr(cfg, "num_key_value_heads", None), "head_dim": getattr(cfg, "head_dim", None),
             "parameters": sum(p.numel() for p in model.parameters()), **(card or {})}
    lines = ["---", "library_name: transformers", "tags: [hf_accel, pruned, structured-pruning]", "---", "",
             f"# {cfg.name_or_path or type(model).__name__} (structured-pruned)", "",
             "Pruned with hf_accel `shrink` (whole MLP channels and KV groups removed, equal sizes in every layer), "
             "so this is an ordinary, smaller checkpoint: `AutoModelForCausalLM.from_pretrained` loads it without "
             "hf_accel.", "", "| fact | value |", "| --- | --- |"]
    lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in facts.items()]
    (directory / "README.md").write_text("\n".join(lines) + "\n")
    return directory
