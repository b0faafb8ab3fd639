"""Calibrated quantization (AWQ, GPTQ) and the non-default data-free paths (outliers, integer/symmetric zeros).

Calibration data: the train split of the reference corpus through the quality harness's loader
(`hf_accel.quality.token_stream`), tokenized with the model's own tokenizer (found from `config._name_or_path`), or
with the one given by `with calibration(tokenizer=tok):` (or raw ids: `calibration(ids=...)`). The held-out split
that the harness evaluates on is never used.

Sequential, block by block (as GPTQ and AWQ do): the decoder blocks are the children of the model's largest
ModuleList. For block i the model runs on the calibration batches and stops right after block i (so blocks before
it are already quantized and their error is seen), hooks on block i's linears collect X^T X (GPTQ's Hessian; AWQ measures
output errors through it too), mean |x| (AWQ) and the input RMS (outlier scores); then block i is quantized, every change through the
Patcher (removable until the spec commits; atomic with the rest of the spec). Linears outside the blocks come last.

Where AWQ's scales go (s divides the producer's output, multiplies the consumer's input columns):
- into the norm whose output is the linears' input (found by tensor identity in a forward pass, so it works on any
  architecture; checked numerically): Llama/Qwen2/Mistral/Gemma input_layernorm -> q/k/v and
  post_attention_layernorm -> gate/up (Gemma's (1 + w) weight handled), GPT-2 ln_1 -> c_attn and ln_2 -> c_fc;
- into the previous linear's output rows: v_proj -> o_proj when v_proj and o_proj have the same width (MHA; with
  GQA the heads do not line up and o_proj is not scaled), up_proj -> down_proj (gated MLPs), GPT-2's value columns
  of c_attn -> attn.c_proj;
- nowhere for GPT-2's mlp.c_proj (after a GELU): that linear gets AWQ's clipping search only.
After folding, the block's output on a calibration batch must be unchanged (else an AccelError names the block).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_accel.errors import AccelError, OptionError

from .linear import WeightOnlyLinearPlugin, iter_linears, linear_parts
from .methods import (Grid, Quantized, awq_search_clip, awq_search_scale, outlier_count, quantize_gptq,
                      quantize_rtn, select_outliers)

CALIBRATED = ("awq", "gptq")
NO_CLIP = ("q_proj", "k_proj", "c_attn", "query", "key", "qkv_proj", "Wqkv")  # AutoAWQ: never clip q/k


class CalibrationError(AccelError):
    """Calibration data could not be found or does not fit the model."""


@dataclass
class _Source:
    tokenizer: Any = None
    ids: Optional[torch.Tensor] = None


_SOURCE: contextvars.ContextVar[Optional[_Source]] = contextvars.ContextVar("hf_accel_calibration", default=None)


@contextlib.contextmanager
def calibration(tokenizer: Any = None, ids: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Calibrate with this tokenizer (on the reference corpus) or these token ids [n, seq] inside the block."""
    token = _SOURCE.set(_Source(tokenizer, ids))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _tokenizer_of(model: nn.Module, method: str):
    cfg = getattr(model, "config", None)
    path = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    if not path:
        raise CalibrationError(
            f"method={method!r} calibrates on the reference corpus and needs the model's tokenizer, but the model "
            "does not say where it was loaded from. Pass one: `with hf_accel.plugins.quantization.calibrate."
            "calibration(tokenizer=tok): hf_accel.apply(model, spec)` (or ids=LongTensor[n, seq])")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CalibrationError(
            f"method={method!r} calibrates on the reference corpus and needs the model's tokenizer; none could be "
            f"loaded from {path!r} ({type(e).__name__}: {e}). Pass one: `with hf_accel.plugins.quantization."
            "calibrate.calibration(tokenizer=tok): ...` (or ids=LongTensor[n, seq])") from e


_STREAMS: dict = {}


def calibration_ids(model: nn.Module, tokens: int, seq_len: int, method: str) -> torch.Tensor:
    """[n, seq] token ids from the train split of the reference corpus (or the ids given to `calibration`)."""
    source = _SOURCE.get() or _Source()
    if source.ids is not None:
        ids = torch.as_tensor(source.ids, dtype=torch.long)
        if ids.dim() != 2 or ids.numel() == 0:
            raise CalibrationError(f"calibration ids must be a non-empty LongTensor [n, seq], got shape {tuple(ids.shape)}")
        return ids
    from hf_accel.quality import token_stream

    tokenizer = source.tokenizer or _tokenizer_of(model, method)
    seq_len = min(seq_len, _max_positions(model))
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer), max(tokens, seq_len))
    if key not in _STREAMS:  # tokenizing the corpus is the slow part of a small model's calibration
        _STREAMS.clear()
        _STREAMS[key] = token_stream(tokenizer, "train", key[2])
    stream = _STREAMS[key]
    n = len(stream) // seq_len
    if n == 0:
        raise CalibrationError(f"the reference corpus gave {len(stream)} tokens, fewer than one sequence of {seq_len}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab and int(stream.max()) >= vocab:
        raise CalibrationError(f"the tokenizer makes ids up to {int(stream.max())} but the model's vocabulary has "
                               f"{vocab}: pass the model's own tokenizer with calibration(tokenizer=...)")
    return stream[: n * seq_len].view(n, seq_len)


# -- the plugin base -------------------------------------------------------------------------------------------
@dataclass
class CalibratedWeightPlugin(WeightOnlyLinearPlugin):
    """int4/int8 plumbing for calibrated methods and sparse outliers (options shared by both formats)."""

    outliers: float = 0.0  # fraction of each row's weights kept exactly in a sparse side matrix (e.g. 0.005)
    calibration_tokens: int = 32768  # awq/gptq: tokens of the reference corpus's train split
    calibration_seq_len: int = 512  # awq/gptq: sequence length (capped at the model's context)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.outliers <= 0.1:
            raise OptionError(f"plugin {self.name!r}: option 'outliers' is a fraction of the weights in [0, 0.1] "
                              f"(e.g. 0.005 for 0.5%), got {self.outliers}")
        if self.calibration_tokens < 1 or self.calibration_seq_len < 2:
            raise OptionError(f"plugin {self.name!r}: options 'calibration_tokens' (>= 1) and 'calibration_seq_len' "
                              f"(>= 2) must be positive, got {self.calibration_tokens}, {self.calibration_seq_len}")

    def uses_default_path(self) -> bool:
        raise NotImplementedError

    def grid(self, dtype: torch.dtype) -> Grid:
        raise NotImplementedError

    def from_result(self, linear: nn.Module, result: Quantized) -> nn.Module:
        raise NotImplementedError

    def apply(self, model, patcher):
        if self.uses_default_path():
            return super().apply(model, patcher)
        targets = list(iter_linears(model, self.skip))
        if not targets:
            raise OptionError(
                f"plugin {self.name!r} found no linear layer to quantize in {type(model).__name__} (skip={list(self.skip)})")
        if self.method in CALIBRATED:
            _calibrated(model, patcher, self, [n for n, _ in targets])
        else:
            for name, linear in tqdm(targets, desc=f"{self.name} {self.method}", leave=False):
                result = _quantize(self, linear, _weight(linear), None, None, name)
                patcher.swap_module(model, name, self.from_result(linear, result), rewrites_weights=True)


def _weight(linear: nn.Module) -> torch.Tensor:
    return linear_parts(linear)[2].detach().float()


def _pad(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    k = w.shape[-1]
    gs = grid.group(k)
    kp = -(-k // gs) * gs
    return nn.functional.pad(w, (0, kp - k)) if kp != k else w


def _quantize(plugin, linear: nn.Module, w: torch.Tensor, act_rms, hessian, name: str) -> Quantized:
    """Weight w [N, K] (float32) of `linear` (or rows stacked like it) with the plugin's method; second moment
    or hessian [K, K] (gptq: X^T X / T; awq: the same for the scaled input)."""
    in_f, _, weight, _ = linear_parts(linear)
    grid = plugin.grid(weight.dtype)
    wp = _pad(w, grid)
    kp = wp.shape[1]
    rms = None if act_rms is None else _pad(act_rms[None], grid)[0]
    mask = select_outliers(wp, grid, outlier_count(plugin.outliers, in_f), in_f, rms)
    if hessian is not None:
        h = torch.zeros(kp, kp, device=w.device)
        h[:in_f, :in_f] = hessian
    if plugin.method == "gptq":
        return quantize_gptq(wp, h, grid, mask)
    if plugin.method == "awq":
        clip = None if name.rsplit(".", 1)[-1] in NO_CLIP else awq_search_clip(wp, h, grid, mask)
        return quantize_rtn(wp, grid, mask, clip=clip)
    return quantize_rtn(wp, grid, mask, hqq=plugin.method == "hqq")


# -- calibration ------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


@dataclass
class _Stats:
    n: int = 0
    sq: Optional[torch.Tensor] = None
    absum: Optional[torch.Tensor] = None
    hessian: Optional[torch.Tensor] = None
    leader: Optional[str] = None  # the first linear that read the same input tensor (shares its statistics)


def _blocks(model: nn.Module) -> tuple[str, Optional[nn.ModuleList]]:
    best = ("", None, 0)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            n = sum(p.numel() for p in module.parameters())
            if n > best[2]:
                best = (name, module, n)
    return best[0], best[1]


def _stages(model: nn.Module, names: list[str]) -> list[tuple[Optional[str], list[str]]]:
    """[(block name or None for the rest, linears)] in forward order."""
    prefix, blocks = _blocks(model)
    stages, rest = [], list(names)
    if blocks is not None:
        for i in range(len(blocks)):
            block = f"{prefix}.{i}" if prefix else str(i)
            inside = [n for n in rest if n.startswith(block + ".")]
            if inside:
                stages.append((block, inside))
                rest = [n for n in rest if n not in inside]
    if rest:
        stages.append((None, rest))
    return stages


def _is_norm(module: nn.Module, width: int) -> bool:
    w = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1
            and w.shape[0] == width)


def _calibrated(model: nn.Module, patcher, plugin, names: list[str]) -> None:
    ids = calibration_ids(model, plugin.calibration_tokens, plugin.calibration_seq_len, plugin.method)
    stages = _stages(model, names)
    for block, linears in tqdm(stages, desc=f"{plugin.name}({plugin.method}) calibration", unit="block"):
        _stage(model, patcher, plugin, block, linears, ids)


@torch.no_grad()
def _stage(model: nn.Module, patcher, plugin, block_name: Optional[str], names: list[str], ids: torch.Tensor) -> None:
    device = next(model.parameters()).device
    method = plugin.method
    stats = {n: _Stats() for n in names}
    batch_rows = max(1, 16384 // ids.shape[1])
    first: dict[str, Any] = {"inputs": {}, "outputs": {}, "norm_in": {}}
    state = {"batch": 0}
    handles = []

    def linear_hook(name):
        def hook(module, args):
            x = args[0]
            st = stats[name]
            if state["batch"] == 0:
                for other, seen in first["inputs"].items():
                    if seen is x:
                        st.leader = other
                        break
                first["inputs"][name] = x
            if st.leader is not None:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            st.n += x2.shape[0]
            st.sq = x2.pow(2).sum(0) if st.sq is None else st.sq + x2.pow(2).sum(0)
            h = x2.T @ x2
            st.hessian = h if st.hessian is None else st.hessian + h
            if method == "awq":
                st.absum = x2.abs().sum(0) if st.absum is None else st.absum + x2.abs().sum(0)
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(linear_hook(name)))
    block = model.get_submodule(block_name) if block_name else None
    if block is not None:
        def out_hook(name):
            def hook(module, args, output):
                if state["batch"] == 0:
                    first["outputs"][name] = output
                    if args:
                        first["norm_in"][name] = args[0]
            return hook

        for sub_name, sub in block.named_modules():
            full = f"{block_name}.{sub_name}" if sub_name else block_name
            if sub_name and full not in stats:
                handles.append(sub.register_forward_hook(out_hook(full)))

        def block_pre(module, args, kwargs):
            if state["batch"] == 0:
                first["block_args"], first["block_kwargs"] = args, kwargs

        def block_post(module, args, kwargs, output):
            if state["batch"] == 0:
                first["block_out"] = output
            raise _Stop

        handles.append(block.register_forward_pre_hook(block_pre, with_kwargs=True))
        handles.append(block.register_forward_hook(block_post, with_kwargs=True))
    try:
        for b in range(0, ids.shape[0], batch_rows):
            try:
                model(input_ids=ids[b:b + batch_rows].to(device), use_cache=False)
            except _Stop:
                pass
            state["batch"] += 1
    finally:
        for h in handles:
            h.remove()

    # statistics of followers are their leader's
    def lead(name):
        return stats[name].leader or name

    scales: dict[str, torch.Tensor] = {}  # per linear: its input columns were multiplied by this
    work: dict[str, nn.Module] = {}  # float copies that carry folded scales

    def working(name: str) -> nn.Module:
        if name not in work:
            work[name] = copy.deepcopy(model.get_submodule(name))
        return work[name]

    if method == "awq":
        _awq_fold(model, patcher, plugin, block_name, names, stats, first, lead, scales, working)
        for name, module in work.items():  # float copies with the folded scales, before quantizing
            patcher.swap_module(model, name, module, rewrites_weights=True)
        if block is not None and work:
            _check_block(block, block_name, first)

    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(lead(name), []).append(name)
    for leader, members in groups.items():
        st = stats[leader]
        if st.n == 0:
            raise CalibrationError(f"{leader} saw no calibration input (is it used in the forward pass?)")
        rms = (st.sq / st.n).sqrt()
        gram = st.hessian / st.n
        if method == "gptq":
            # linears reading the same input share H: quantize their stacked rows in one GPTQ pass
            mods = [model.get_submodule(n) for n in members]
            ws = [_weight(m) for m in mods]
            result = _quantize(plugin, mods[0], torch.cat(ws), rms, gram, leader)
            r0 = 0
            for name, mod, w in zip(members, mods, ws):
                part = _rows(result, r0, r0 + w.shape[0])
                r0 += w.shape[0]
                patcher.swap_module(model, name, plugin.from_result(mod, part), rewrites_weights=True)
        else:
            for name in members:
                mod = model.get_submodule(name)
                s = scales.get(name)
                g, r = (gram, rms) if s is None else (gram / (s[:, None] * s[None, :]), rms / s)
                result = _quantize(plugin, mod, _weight(mod), r, g, name)
                patcher.swap_module(model, name, plugin.from_result(mod, result), rewrites_weights=True)


def _rows(result: Quantized, r0: int, r1: int) -> Quantized:
    def cut(t):
        return None if t is None else t[r0:r1]

    return Quantized(result.codes[r0:r1], result.scale[r0:r1], result.zero[r0:r1], cut(result.outlier_index),
                     cut(result.outlier_value))


def _sibling(names_in_model: set, name: str, old: str, new: str) -> Optional[str]:
    if not name.endswith("." + old):
        return None
    other = name[: -len(old)] + new
    return other if other in names_in_model else None


def _awq_fold(model, patcher, plugin, block_name, names, stats, first, lead, scales, working) -> None:
    all_modules = dict(model.named_modules())
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(lead(name), []).append(name)
    for leader, members in groups.items():
        st = stats[leader]
        gram = st.hessian / st.n
        absmean = st.absum / st.n
        width = gram.shape[1]
        # 1. the producer of the input: a norm (by tensor identity), or a previous linear (by the rules)
        x_obj = first["inputs"].get(leader)
        producer = next((n for n, out in first["outputs"].items() if out is x_obj), None)
        fold = None
        if producer is not None and _is_norm(all_modules[producer], width):
            fold = ("norm", producer, None)
        elif len(members) == 1:
            name = members[0]
            v = _sibling(all_modules, name, "o_proj", "v_proj")
            up = _sibling(all_modules, name, "down_proj", "up_proj")
            c_attn = _sibling(all_modules, name, "attn.c_proj", "attn.c_attn")
            if v and linear_parts(all_modules[v])[1] == width:
                fold = ("linear", v, None)
            elif up and _sibling(all_modules, name, "down_proj", "gate_proj"):
                fold = ("linear", up, None)
            elif c_attn and linear_parts(all_modules[c_attn])[1] == 3 * width:
                fold = ("linear", c_attn, (2 * width, 3 * width))
        if fold is None:
            continue
        weights = [_weight(working(n)) for n in members]
        grid = plugin.grid(linear_parts(all_modules[members[0]])[2].dtype)
        s, _, _ = awq_search_scale(weights, gram, absmean, grid)
        if torch.all(s == 1):
            continue
        kind, target, rows = fold
        if kind == "norm":
            norm = copy.deepcopy(all_modules[target])
            if not _fold_norm(norm, all_modules[target], s, first["norm_in"].get(target), first["outputs"][target]):
                continue
            patcher.swap_module(model, target, norm, rewrites_weights=True)
        else:
            prod = working(target) if target in stats else copy.deepcopy(all_modules[target])
            _, _, pw, pb = linear_parts(prod)
            r0, r1 = rows or (0, pw.shape[0])
            pw.data[r0:r1] /= s[:, None].to(pw.dtype)
            if pb is not None:
                pb.data[r0:r1] /= s.to(pb.dtype)
            if target not in stats:
                patcher.swap_module(model, target, prod, rewrites_weights=True)
        for n in members:
            _, _, w, _ = linear_parts(working(n))
            w.data *= s[None, :].to(w.dtype)
            scales[n] = s


def _fold_norm(norm: nn.Module, original: nn.Module, s: torch.Tensor, probe_in, probe_out) -> bool:
    """Make norm(x) = original(x) / s: w / s, or (1 + w) / s - 1 for norms that scale by (1 + w); checked."""
    if probe_in is None:
        return False
    want = probe_out.float() / s
    w0 = original.weight.detach().float()
    b = getattr(original, "bias", None)
    tol = 2e-2 if probe_out.dtype in (torch.bfloat16, torch.float16) else 1e-4
    for candidate in (w0 / s, (1 + w0) / s - 1):
        norm.weight.data.copy_(candidate.to(norm.weight.dtype))
        if isinstance(b, torch.Tensor):
            norm.bias.data.copy_((b.detach().float() / s).to(b.dtype))
        got = norm(probe_in).float()
        if ((got - want).norm() / want.norm().clamp(min=1e-12)) < tol:
            return True
    return False


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None)


def _check_block(block: nn.Module, block_name: str, first: dict) -> None:
    if "block_args" not in first or "block_out" not in first:
        return
    want = _first_tensor(first["block_out"])
    got = _first_tensor(block(*first["block_args"], **first["block_kwargs"]))
    if want is None or got is None:
        return
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))
    tol = 3e-2 if want.dtype in (torch.bfloat16, torch.float16) else 1e-3
    if err > tol:
        raise CalibrationError(
            f"AWQ scale folding changed the output of {block_name} (relative error {err:.2e}): this architecture's "
            "block does not feed its linears the way the folding rules assume. Use method='gptq' or 'rtn'.")
