"""Calibrated int4/int8 (AWQ, GPTQ), dense-and-sparse outliers and integer/symmetric zeros: the quantizers on their
own, then through accel= on five real architectures (folding, atomicity, reload)."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.errors import AccelError, OptionError
from hf_accel.plugins.quantization.calibrate import CalibrationError, calibration
from hf_accel.plugins.quantization.int4 import Int4Linear
from hf_accel.plugins.quantization.int8 import Int8Linear
from hf_accel.plugins.quantization.methods import (Grid, awq_search_clip, awq_search_scale, quantize_gptq,
                                                   quantize_rtn, select_outliers)

from conftest import VOCAB, build, module_types, sample_ids, state_hash

GRIDS = [Grid(4, 128, "float", torch.float32), Grid(4, 32, "int", torch.bfloat16), Grid(4, 64, "symmetric", torch.float32),
         Grid(8, 0, "symmetric", torch.float32)]


def problem(n=128, k=256, t=2048, seed=0):
    """Weights, and inputs with correlated channels and a few large ones (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(t, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5) + 0.1 * torch.randn(t, k, generator=g)
    x[:, :6] *= 20
    return w, x.T @ x / t, x.abs().mean(0)


def out_err(w, wq, gram):
    d = w - wq
    return float(((d @ gram) * d).sum())


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.bits}b-g{g.group_size}-{g.zero}")
def test_calibrated_methods_lower_the_output_error(grid):
    w, gram, absmean = problem()
    rtn = out_err(w, quantize_rtn(w, grid).dequantize(grid), gram)
    gptq = out_err(w, quantize_gptq(w, gram, grid).dequantize(grid), gram)
    s, a, gain = awq_search_scale([w], gram, absmean, grid)
    ws, gs = w * s, gram / (s[:, None] * s[None])
    awq = out_err(w, quantize_rtn(ws, grid, clip=awq_search_clip(ws, gs, grid)).dequantize(grid) / s, gram)
    assert a > 0 and gain > 0
    assert gptq < 0.5 * rtn, (gptq, rtn)  # measured ~0.2x
    assert awq < 0.8 * rtn, (awq, rtn)  # measured ~0.4x


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.bits}b-g{g.group_size}-{g.zero}")
def test_outliers_are_exact_and_help(grid):
    w, gram, _ = problem()
    w[3, 100] = 2.0  # one weight far outside its group
    mask = select_outliers(w, grid, 3, w.shape[1], gram.diag().sqrt())
    assert mask.sum(1).eq(3).all() and mask[3, 100]
    q = quantize_rtn(w, grid, mask)
    deq = q.dequantize(grid)
    tol = 1e-2 * w.abs().max() if grid.dtype == torch.bfloat16 else 1e-6
    assert (deq - w)[mask].abs().max() <= tol  # kept exactly (up to the value's storage dtype)
    assert out_err(w, deq, gram) < out_err(w, quantize_rtn(w, grid).dequantize(grid), gram)
    g = quantize_gptq(w, gram, grid, mask)
    assert (g.dequantize(grid) - w)[mask].abs().max() < 0.05  # GPTQ's updated weight there, not the original


def test_integer_and_symmetric_zero_points():
    w, _, _ = problem()
    _, z = Grid(4, 64, "int", torch.bfloat16).fit(w.reshape(128, -1, 64))
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15
    _, z = Grid(4, 64, "symmetric", torch.float32).fit(w.reshape(128, -1, 64))
    assert (z == 8).all()


# -- through accel= ---------------------------------------------------------------------------------------------
CALIB = torch.randint(3, VOCAB, (8, 64), generator=torch.Generator().manual_seed(5))
ARCHS = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["int4(method=awq)", "int4(method=gptq, group_size=32, outliers=0.02)", "int8(method=gptq)"])
def test_calibrated_apply_on_real_architectures(arch, spec):
    model = build(arch)
    ref_model = copy.deepcopy(model)
    ids = sample_ids()
    ref = model(ids).logits
    with calibration(ids=CALIB):
        hf_accel.apply(model, spec)
    cls = Int8Linear if spec.startswith("int8") else Int4Linear
    quantized = [n for n, m in model.named_modules() if isinstance(m, cls)]
    assert len(quantized) == (8 if arch == "gpt2" else 14)
    assert isinstance(model.lm_head, nn.Linear)
    err = rel(model(ids).logits, ref)
    assert 0 < err < (0.03 if spec.startswith("int8") else 0.2), err
    if "awq" in spec:  # the scales went into norms in front of q/k/v or gate/up (changed norm weights)
        norms = [n for n, m in ref_model.named_modules() if "norm" in type(m).__name__.lower() and ".0." not in n[-3:]]
        changed = [n for n in norms if not torch.equal(model.get_submodule(n).weight, ref_model.get_submodule(n).weight)]
        assert changed and all(".ln_f" not in n and n != "model.norm" for n in changed), changed


@pytest.mark.parametrize("spec", ["int4(method=gptq, outliers=0.02)", "int8(method=awq, outliers=0.01)",
                                  "int4(method=rtn, zero_point=int)"])
def test_calibrated_artifact_reloads_bit_identically(tmp_path, spec):
    build("qwen2").save_pretrained(tmp_path / "base")
    with calibration(ids=CALIB):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", accel=spec)
    ids = sample_ids()
    logits = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")  # no calibration needed to load
    assert module_types(reloaded) == module_types(model)
    assert state_hash(reloaded) == state_hash(model)
    assert torch.equal(reloaded(ids).logits, logits)


def test_without_calibration_data_the_model_is_left_unchanged():
    model = build("llama")
    before = state_hash(model)
    with pytest.raises(CalibrationError, match="tokenizer"):
        hf_accel.apply(model, "int4(method=gptq)")  # built from a config: nowhere to find a tokenizer
    assert state_hash(model) == before and hf_accel.get_config(model).names == []
    with pytest.raises(CalibrationError, match="vocabulary"):
        with calibration(ids=None, tokenizer=_BigTokenizer()):
            hf_accel.apply(model, "int8(method=awq)")
    assert state_hash(model) == before


class _BigTokenizer:
    """Makes ids beyond the model's vocabulary."""
    name_or_path, eos_token_id = "big", 99999

    def __len__(self):
        return 100000

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[5000] * 100 for _ in texts]}


def test_remove_reports_the_folded_norms_as_irreversible():
    model = build("llama")
    with calibration(ids=CALIB):
        hf_accel.apply(model, "int4(method=awq)")
    with pytest.warns(UserWarning, match="cannot be undone"):
        left = hf_accel.remove(model)
    assert any("input_layernorm" in x for x in left)


def test_option_errors():
    for bad in ("int4(outliers=0.5)", "int8(method=hqq)", "int4(zero_point=sym)", "int8(calibration_tokens=0)"):
        with pytest.raises(OptionError):
            hf_accel.AccelConfig.from_spec(bad)


@pytest.mark.slow
def test_quality_script_on_tiny_sees_a_damaged_quantizer(tmp_path, monkeypatch):
    """scripts/quality_quant.py on the shipped tiny reference: GPTQ beats RTN, and a quantizer whose scales are 4x
    too coarse (2 of 4 bits wasted) is measurably worse than the real one."""
    import importlib.util
    import pathlib

    from hf_accel.plugins.quantization import methods
    from hf_accel.quality.reference import reference_path

    path = pathlib.Path(__file__).parent.parent / "scripts" / "quality_quant.py"
    spec = importlib.util.spec_from_file_location("quality_quant", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--model", str(reference_path("tiny")), "--device", "cpu", "--smoke"]
    good = script.main(args + ["--out", str(tmp_path / "good.json"), "--variants", "int4 g128 rtn,int4 g128 gptq"])
    assert good["variants_run"] == 2 and good["variants_failed"] == 0
    assert good["int4_g128_gptq_kl"] < good["int4_g128_rtn_kl"]

    fit = methods.Grid.fit
    monkeypatch.setattr(methods.Grid, "fit", lambda self, wg, valid=None: (lambda s, z: (s * 4, z))(*fit(self, wg, valid)))
    bad = script.main(args + ["--out", str(tmp_path / "bad.json"), "--variants", "int4 g128 gptq"])
    assert bad["int4_g128_gptq_kl"] > 3 * good["int4_g128_gptq_kl"], (bad, good)
    assert bad["int4_g128_gptq_ppl_change_pct"] > good["int4_g128_gptq_ppl_change_pct"]
    saved = json.loads((tmp_path / "bad.json").read_text())
    assert saved["summary"]["command"] and saved["records"] and saved["rows"][0]["label"] == "unquantized"


# -- compressed-tensors export -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", ["int4(method=gptq, zero_point=int, group_size=32)",
                                  "int4(method=hqq, zero_point=symmetric, group_size=64)", "int8(method=awq)", "fp8"])
def test_compressed_tensors_export_reloads_exactly(tmp_path, arch, spec):
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    from hf_accel.plugins.quantization.export import export_compressed_tensors, verify_compressed_tensors

    model = build(arch)
    with calibration(ids=CALIB):
        hf_accel.apply(model, spec)
    qconfig = export_compressed_tensors(model, tmp_path / "ct")
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["ignore"] == ["lm_head"]
    fmt = {"int4": "pack-quantized", "int8": "int-quantized", "fp8": "float-quantized"}[spec[:4].rstrip("(")]
    assert qconfig["format"] == fmt
    weights = qconfig["config_groups"]["group_0"]["weights"]
    if spec.startswith("int4"):
        assert weights["group_size"] == (32 if "32" in spec else 64)
        assert weights["symmetric"] == ("symmetric" in spec)
        with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
            names = set(f.keys())
        assert "model.layers.0.mlp.down_proj.weight_packed" in names
        assert ("model.layers.0.mlp.down_proj.weight_zero_point" in names) == ("symmetric" not in spec)
    diffs = verify_compressed_tensors(model, tmp_path / "ct")  # transformers + compressed-tensors, decompressed
    assert len(diffs) == 14 and max(diffs.values()) == 0.0


def test_compressed_tensors_export_refuses_what_it_cannot_write(tmp_path):
    pytest.importorskip("compressed_tensors")
    from hf_accel.plugins.quantization.export import ExportError, export_compressed_tensors

    cases = [("llama", "int4(method=rtn, group_size=32)", "zero_point=int"),  # float zero points
             ("llama", "int8(outliers=0.02)", "outliers"),
             ("llama", "int4(zero_point=int, group_size=128)", "multiple of its group size"),  # K = 64 < 128
             ("gpt2", "int8", "Conv1D")]
    for arch, spec, message in cases:
        model = build(arch)
        hf_accel.apply(model, spec)
        with pytest.raises(ExportError, match=message):
            export_compressed_tensors(model, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="no int4/int8/fp8"):
        export_compressed_tensors(build("llama"), tmp_path / "x")
