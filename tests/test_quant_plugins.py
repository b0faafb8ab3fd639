"""int4 / fp8 (and int8) weight plugins through accel=: real architectures, artifacts that reload bit-identically,
quantization error within what each format should give, conflicts."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.errors import ConflictError, OptionError
from hf_accel.kernels import int4_dequantize, w8_dequantize
from hf_accel.plugins.quantization.fp8 import Fp8Linear, quantize_fp8
from hf_accel.plugins.quantization.int4 import Int4Linear, quantize_int4
from hf_accel.plugins.quantization.int8 import quantize_per_channel

from conftest import build, module_types, sample_ids

ARCHS3 = ["llama", "qwen2", "gpt2"]  # qwen2: biased q/k/v; gpt2: transposed Conv1D weights
SPECS = {"int4": "Int4Linear", "int4(group_size=32, method=rtn)": "Int4Linear", "fp8": "Fp8Linear"}


def sqnr_db(w: torch.Tensor, wq: torch.Tensor) -> float:
    w, wq = w.double(), wq.double()
    return (10 * torch.log10(w.pow(2).sum() / (w - wq).pow(2).sum())).item()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def heavy_tailed(n=256, k=512, seed=0) -> torch.Tensor:
    """Weights like a trained LLM's: mostly Gaussian, heavier tails (Student-t, 4 dof), some larger rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((n, k)) * 0.02
    return (w * (1 + 2 * torch.rand(n, 1, generator=g))).to(torch.bfloat16)


# -- the formats ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size,low", [(32, 19.0), (64, 17.5), (128, 16.0)])
def test_int4_quantization_error(group_size, low):
    """4-bit asymmetric: ~6 dB per bit minus the cost of a heavy-tailed group range; smaller groups are better,
    HQQ's data-free zero optimisation beats round-to-nearest, and nothing is better than it can be."""
    w = heavy_tailed()
    got = {}
    for method in ("rtn", "hqq"):
        q, s, z = quantize_int4(w, group_size, method)
        assert q.dtype == torch.int32 and q.shape == (256, 512 // 8) and s.shape == z.shape == (256, 512 // group_size)
        assert s.dtype == z.dtype == torch.bfloat16
        got[method] = sqnr_db(w.float(), int4_dequantize(q, s, z, group_size, 512))
    assert low < got["rtn"] < low + 3, got  # measured: 20.6 / 18.6 / 16.8 dB (g32 / g64 / g128)
    assert got["hqq"] > got["rtn"] + 0.1, got


def test_int4_group_size_ordering_and_padding():
    w = heavy_tailed(64, 200)  # K = 200: padded to a multiple of every group size
    db = []
    for g in (32, 64, 128):
        q, s, z = quantize_int4(w, g, "rtn")
        assert q.shape[1] * 8 == -(-200 // g) * g
        deq = int4_dequantize(q, s, z, g, 200)
        assert deq.shape == (64, 200)
        db.append(sqnr_db(w.float(), deq))
    assert db[0] > db[1] > db[2], db


def test_int4_rtn_error_is_at_most_half_a_step():
    w = heavy_tailed(32, 256)
    q, s, z = quantize_int4(w, 64, "rtn", dtype=torch.float32)
    err = (w.float() - int4_dequantize(q, s, z, 64, 256)).abs().reshape(32, 4, 64)
    assert (err <= s[..., None] / 2 + 1e-6).all()


def test_int8_and_fp8_quantization_error():
    w = heavy_tailed()
    q, s = quantize_per_channel(w)
    int8_db = sqnr_db(w.float(), q.float() * s[:, None])
    q8, s8 = quantize_fp8(w)
    assert q8.dtype == torch.float8_e4m3fn and s8.dtype == torch.bfloat16
    fp8_db = sqnr_db(w.float(), w8_dequantize(q8, s8, torch.float32))
    assert 34 < int8_db < 40, int8_db  # 8-bit uniform grid over the row's range (measured 36.4 dB)
    assert 29 < fp8_db < 34, fp8_db  # 3 mantissa bits: ~31 dB whatever the range (measured 31.9 dB)


# -- through accel= ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS3)
@pytest.mark.parametrize("spec", list(SPECS))
def test_apply_quantizes_every_linear_but_the_head(arch, spec):
    model = build(arch)
    ids = sample_ids()
    ref = model(ids).logits
    hf_accel.apply(model, spec)
    kinds = {type(m).__name__ for n, m in model.named_modules()
             if n.endswith(("q_proj", "k_proj", "c_attn", "down_proj", "c_proj", "mlp.c_fc"))}
    assert kinds == {SPECS[spec]}
    assert type(model.lm_head).__name__ == "Linear"
    out = model(ids).logits
    err = rel(out, ref)
    bound = 0.03 if spec == "fp8" else 0.2  # int4 on a 2-layer random model: visible, bounded
    assert 0 < err < bound, err
    assert hf_accel.get_config(model).names == [spec.split("(")[0]]


@pytest.mark.parametrize("arch", ARCHS3)
@pytest.mark.parametrize("spec", ["int4(group_size=64)", "fp8"])
def test_save_and_reload_is_bit_identical(saved_model, tmp_path, arch, spec):
    base_dir, _ = saved_model
    model = AutoModelForCausalLM.from_pretrained(base_dir, accel=spec)
    ids = sample_ids()
    logits = model(ids).logits
    out = tmp_path / "artifact"
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["plugins"][0]["name"] == spec.split("(")[0]

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert hf_accel.get_config(reloaded) == hf_accel.get_config(model)
    assert module_types(reloaded) == module_types(model)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key].view(torch.uint8), after[key].view(torch.uint8)), key  # bits, fp8 too
    assert torch.equal(reloaded(ids).logits, logits)


def test_int4_artifact_layout(saved_model, tmp_path):
    from safetensors import safe_open

    base_dir, _ = saved_model
    model = AutoModelForCausalLM.from_pretrained(base_dir, accel="int4(group_size=32)")
    model.save_pretrained(tmp_path / "a")
    layer = next(m for m in model.modules() if isinstance(m, Int4Linear))
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    packed = [n for n in names if n.endswith(".weight") and f"{n[:-7]}.weight_zero" in names]
    assert packed and all(f"{n[:-7]}.weight_scale" in names for n in packed)
    assert layer.weight.dtype == torch.int32 and layer.weight.shape[1] * 8 == layer.in_features
    assert layer.weight_scale.shape == (layer.out_features, layer.in_features // 32)


def test_dtype_and_generate():
    for spec in ("int4", "fp8"):
        model = build("llama").to(torch.bfloat16)
        hf_accel.apply(model, spec)
        layer = model.model.layers[0].mlp.up_proj
        assert layer.weight_scale.dtype == torch.bfloat16
        out = model.generate(sample_ids(1, 6), max_new_tokens=5, do_sample=False)
        assert out.shape == (1, 11)


def test_forward_matches_the_dequantised_weight():
    """The module computes exactly x @ dequantize().T + b (CPU reference path), incl. GPT-2's Conv1D and biases."""
    model = build("gpt2")
    hf_accel.apply(model, "int4(group_size=32, method=rtn)")
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + layer.bias)
    model = build("qwen2")
    hf_accel.apply(model, "fp8")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Fp8Linear) and layer.bias is not None
    torch.testing.assert_close(layer(x[:, :64]), x[:, :64] @ layer.dequantize().T + layer.bias, rtol=1e-4, atol=1e-5)


# -- options and conflicts --------------------------------------------------------------------------------------
def test_quantization_plugins_are_mutually_exclusive():
    model = build("llama")
    for spec in ("int4+fp8", "int8+int4", "fp8+int8"):
        with pytest.raises(ConflictError, match="cannot be combined"):
            hf_accel.apply(model, spec)
    hf_accel.apply(model, "int4")
    with pytest.raises(ConflictError):
        hf_accel.apply(model, "fp8")


def test_bad_options_are_refused_with_what_is_accepted():
    model = build("llama")
    with pytest.raises(OptionError, match=r"group_size.*\[32, 64, 128\]"):
        hf_accel.apply(model, "int4(group_size=100)")
    with pytest.raises(OptionError, match="'rtn' \\| 'hqq'"):
        hf_accel.apply(model, "int4(method=foo)")
    with pytest.raises(OptionError, match="found no linear"):
        hf_accel.apply(model, "fp8(skip=['*'])")
    assert not hf_accel.get_config(model)


def test_skip_patterns_and_card_metadata():
    model = build("llama").to(torch.bfloat16)
    hf_accel.apply(model, "int4(group_size=32, skip=['lm_head', '*.down_proj'])")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    meta = hf_accel.get_config(model).plugins[0].card_metadata(model)
    assert meta["int4_group_size"] == 32 and meta["int4_bits_per_weight"] == 5.0, meta  # 4 + 2 x 16 bits / 32


# -- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["int8", "int4", "int4(group_size=32)", "fp8"])
def test_gpu_model_matches_the_cpu_reference(spec):
    """Same quantized weights: the Triton path on CUDA (decode, small batch, prefill) vs the torch path."""
    model = build("llama").to(torch.bfloat16)
    hf_accel.apply(model, spec)
    for ids in (sample_ids(1, 1), sample_ids(4, 1), sample_ids(2, 80)):
        ref = model(ids).logits.float()
        got = model.cuda()(ids.cuda()).logits.float().cpu()
        model.cpu()
        assert rel(got, ref) < 2e-2, (spec, ids.shape, rel(got, ref))


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph_capture():
    """A quantized model runs under torch.compile and replays from a CUDA graph (the ops themselves are checked
    with fullgraph=True in test_kernels_quant.py)."""
    model = build("llama").to(torch.bfloat16)
    hf_accel.apply(model, "int4")
    model.cuda()
    ids = sample_ids(1, 1).cuda()
    eager = model(ids).logits
    compiled = torch.compile(lambda i: model(i).logits)
    torch.testing.assert_close(compiled(ids), eager)
    static = ids.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model(static).logits
    static.copy_(sample_ids(1, 1, seed=5).cuda())
    g.replay()
    torch.testing.assert_close(out, model(static).logits)
