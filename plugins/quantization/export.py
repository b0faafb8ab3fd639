"""Export int4 / int8 / fp8 models to the `compressed-tensors` format, which vLLM serves.

    from hf_accel.plugins.quantization.export import export_compressed_tensors, verify_compressed_tensors
    export_compressed_tensors(model, "out")       # model quantized with int4(zero_point=int|symmetric), int8 or fp8
    verify_compressed_tensors(model, "out")       # reload with compressed-tensors, compare dequantised weights
    python -m hf_accel.plugins.quantization.export ARTIFACT_DIR OUT_DIR  # an hf_accel artifact folder -> CT folder

Mapping (exact: the exported codes, scales and zero points dequantise to the same weights bit for bit):
- int4 -> "pack-quantized", strategy "group" (group_size 32/64/128), int4 codes q - 8 in [-8, 7] packed 8 per int32
  by compressed-tensors' own `pack_to_int32`; `weight_scale` [out, groups] in the model's dtype; asymmetric:
  `weight_zero_point` = z - 8 (packed along the output dimension), symmetric: none (our z = 8).
  compressed-tensors' zero points are integers, so int4 layers with float zeros (the default `zero_point="float"`,
  RTN/HQQ/AWQ/GPTQ alike) are refused: quantize with `int4(zero_point=int)` or `"symmetric"` to export.
- int8 -> "int-quantized", strategy "channel", symmetric; fp8 -> "float-quantized" (e4m3), strategy "channel".
- Dense-and-sparse layers (`outliers` > 0) have no compressed-tensors form and are refused; so are int4 layers whose
  input width is not a multiple of the group size (hf_accel pads the last group, compressed-tensors does not), and
  models built on transformers' Conv1D (GPT-2).
Linears left in float (e.g. lm_head) are listed in `ignore`. Needs `pip install compressed-tensors` (>= 0.12).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_accel.errors import AccelError
from hf_accel.kernels import unpack_int4

from .fp8 import Fp8Linear
from .int4 import Int4Linear
from .int8 import Int8Linear
from .linear import is_linear


class ExportError(AccelError):
    """The model cannot be written in the requested format (what is accepted is in the message)."""


def _ct():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise ExportError("export to compressed-tensors needs the package: pip install compressed-tensors") from e
    return compressed_tensors, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _scheme_key(name: str, m: nn.Module) -> tuple:
    if getattr(m, "outliers_per_row", 0):
        raise ExportError(f"{name} keeps {m.outliers_per_row} exact outliers per row (dense-and-sparse); "
                          "compressed-tensors has no sparse side matrix. Export a model quantized without outliers.")
    if isinstance(m, Int4Linear):
        z = m.weight_zero.detach().float()
        if not (torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15):
            raise ExportError(
                f"{name} has non-integer int4 zero points (int4 zero_point='float', the default); compressed-tensors "
                "stores integer zero points. Quantize with int4(zero_point=int) or int4(zero_point=symmetric) to export.")
        if m.in_features % m.group_size:
            raise ExportError(f"{name} has {m.in_features} inputs, not a multiple of its group size {m.group_size}; "
                              "compressed-tensors needs whole groups (hf_accel pads the last one). Use a group size "
                              "that divides every layer's input width.")
        return ("int4", m.group_size, bool((z == 8).all()))
    if isinstance(m, Int8Linear):
        return ("int8",)
    return ("fp8",)


def _args(key: tuple, QuantizationArgs):
    if key[0] == "int4":
        return QuantizationArgs(num_bits=4, type="int", symmetric=key[2], strategy="group", group_size=key[1]), "pack-quantized"
    if key[0] == "int8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"), "int-quantized"
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel"), "float-quantized"


def _tensors(key: tuple, m: nn.Module, pack_to_int32) -> dict[str, torch.Tensor]:
    if key[0] == "int4":
        n, k = m.out_features, m.in_features
        q = unpack_int4(m.weight.detach(), m.group_size)[:, :k].to(torch.int16) - 8
        out = {"weight_packed": pack_to_int32(q.to(torch.int8).cpu(), 4).contiguous(),
               "weight_scale": m.weight_scale.detach().cpu().contiguous(),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if not key[2]:
            zp = (m.weight_zero.detach().float() - 8).round().to(torch.int8).cpu()
            out["weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0).contiguous()
        return out
    return {"weight": m.weight.detach().cpu().contiguous(), "weight_scale": m.weight_scale.detach().cpu()[:, None].contiguous()}


def export_compressed_tensors(model: nn.Module, save_directory: str | os.PathLike) -> dict[str, Any]:
    """Write `model` (transformers, quantized by hf_accel's int4/int8/fp8) as a compressed-tensors checkpoint:
    config.json with its `quantization_config`, model.safetensors. Returns that quantization_config."""
    from safetensors.torch import save_file

    ct, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme = _ct()
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear, Fp8Linear))}
    if not quantized:
        raise ExportError(f"{type(model).__name__} has no int4/int8/fp8 layer of hf_accel to export; apply one first "
                          "(e.g. accel='int4(zero_point=int)')")
    if hasattr(sys.modules.get(type(model).__module__), "Conv1D"):
        raise ExportError(f"{type(model).__name__} stores its linears as transformers' Conv1D ([in, out] weights); "
                          "compressed-tensors (and vLLM's loader for it) quantize nn.Linear layers only. Models with "
                          "nn.Linear layers (Llama, Qwen2, Mistral, Gemma, ...) export.")
    keys = {n: _scheme_key(n, m) for n, m in quantized.items()}  # every refusal before anything is written
    schemes = sorted(set(keys.values()), key=str)
    groups, formats = {}, set()
    for i, key in enumerate(schemes):
        args, fmt = _args(key, QuantizationArgs)
        formats.add(fmt)
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{n.replace('.', '[.]')}$" for n, k in keys.items() if k == key]
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args, format=fmt)
    ignore = [n for n, m in model.named_modules() if is_linear(m) and n not in quantized]
    qconfig = QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                 quantization_status="compressed", ignore=ignore)

    state: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf != "bias":
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen and t.numel():  # tied weights (e.g. lm_head = embed_tokens): saved once, as transformers does
            continue
        seen[ptr] = name
        state[name] = t.detach().cpu().contiguous()
    for name, m in quantized.items():
        for leaf, t in _tensors(keys[name], m, pack_to_int32).items():
            state[f"{name}.{leaf}"] = t
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    qdict = {"version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
             **qconfig.model_dump(exclude=["quant_method"])}
    config["quantization_config"] = qdict
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return qdict


@torch.no_grad()
def verify_compressed_tensors(model: nn.Module, directory: str | os.PathLike) -> dict[str, float]:
    """Reload `directory` with transformers + compressed-tensors (decompressed to float) and compare every quantized
    layer's weight with `model`'s dequantised one. Returns {layer: max |difference|} (0.0 when exact)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _ct()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    diffs = {}
    for name, m in model.named_modules():
        if isinstance(m, (Int4Linear, Int8Linear, Fp8Linear)):
            ours = m.dequantize().float().cpu()
            theirs = loaded.get_submodule(name).weight.float().cpu()
            if theirs.shape != ours.shape:
                raise ExportError(f"{name}: reloaded weight has shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")
            diffs[name] = float((ours - theirs).abs().max())
    return diffs


def main(argv=None) -> int:
    import argparse

    import hf_accel  # noqa: F401  (loads hf_accel artifacts)
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description="hf_accel int4/int8/fp8 artifact -> compressed-tensors checkpoint")
    ap.add_argument("artifact")
    ap.add_argument("out")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.artifact)
    export_compressed_tensors(model, args.out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.artifact).save_pretrained(args.out)
    except Exception:
        pass
    if not args.no_verify:
        diffs = verify_compressed_tensors(model, args.out)
        print(f"verified {len(diffs)} layers, max |difference| {max(diffs.values()):.3g}")
    print(f"wrote compressed-tensors checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
