"""W8A8 quantization of diffusion denoisers, joint cache+quant calibration and ToMe token merging, on CPU with tiny
pipelines (the CUDA paths, torch._int_mm / torch._scaled_mm, are exercised by scripts/bench_diffusers.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_diffusion_cache import digits_images, digits_pipe, flux_loop, flux_model, no_hooks_left, psnr, sd_images, sd_pipe

import hf_accel
from hf_accel.errors import AccelError, OptionError, UnsupportedModelError
from hf_accel.plugins.diffusion_cache import cache_stats, diffusion_calibrate
from hf_accel.plugins.diffusion_cache.tome import bipartite_merge
from hf_accel.plugins.quantization.w8a8_diffusion import W8A8Linear, w8a8_matmul
from hf_accel.quality.digits_pipeline import DigitsPipeline


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def quiet_remove(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_accel.remove(pipe)


# -- W8A8 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,tol", [("int8", 0.03), ("fp8", 0.08)])
def test_w8a8_matmul_matches_float_within_the_format_error(fmt, tol):
    g = torch.Generator().manual_seed(0)
    x, lin = torch.randn(40, 64, generator=g), torch.nn.Linear(64, 32)
    q = W8A8Linear.from_module(lin, fmt)
    ref = lin(x)
    out = q(x)
    assert q.weight.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    rel = float((out - ref).norm() / ref.norm().detach())
    assert 0 < rel < tol
    # per-token activation scales: a row scaled by 1000 quantizes exactly like the original row
    x2 = x.clone()
    x2[3] *= 1000
    assert torch.allclose(w8a8_matmul(x2, q.weight, q.weight_scale, None, fmt)[3] / 1000,
                          w8a8_matmul(x, q.weight, q.weight_scale, None, fmt)[3], rtol=1e-4, atol=1e-5)


def test_w8a8_1x1_conv_is_a_linear_over_channels():
    conv = torch.nn.Conv2d(16, 32, 1)
    q = W8A8Linear.from_module(conv, "int8")
    x = torch.randn(2, 16, 5, 3)
    assert q.conv and q(x).shape == (2, 32, 5, 3)
    assert float((q(x) - conv(x)).norm() / conv(x).norm()) < 0.03


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_sd_pipeline_with_cfg(fmt):
    pipe = sd_pipe()
    ref = sd_images(pipe, batch=2)
    hf_accel.apply(pipe, f"w8a8(format={fmt})")
    layers = [(n, m) for n, m in pipe.unet.named_modules() if isinstance(m, W8A8Linear)]
    assert any(m.conv for _, m in layers) and any(not m.conv for _, m in layers)  # proj_in/out 1x1 convs and linears
    assert not any("time_emb" in n for n, _ in layers)  # skipped by default
    out = sd_images(pipe, batch=2)
    assert 25 < psnr(out, ref) < float("inf")
    assert quiet_remove(pipe)  # weight rewrite: reported as not undoable


def test_w8a8_bad_options_and_models_are_refused():
    with pytest.raises(OptionError, match="format must be one of"):
        hf_accel.apply(digits_pipe(), "w8a8(format=int4)")
    pipe = digits_pipe()
    with pytest.raises(OptionError, match="found no linear"):
        hf_accel.apply(pipe, "w8a8(skip=['*'])")
    assert hf_accel.get_config(pipe).names == [] and not any(isinstance(m, W8A8Linear) for m in pipe.unet.modules())


def test_w8a8_saves_and_reloads_bit_identically(tmp_path):
    pipe = hf_accel.apply(digits_pipe(), "w8a8(format=fp8)+deepcache(interval=2)")
    before = digits_images(pipe, steps=6, n=3)
    pipe.save_pretrained(tmp_path / "p")
    again = DigitsPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    assert hf_accel.get_config(again).names == ["w8a8", "deepcache"]
    assert again.unet.down_blocks[1].attentions[0].to_q.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(digits_images(again, steps=6, n=3), before)


def test_w8a8_with_fora_in_a_custom_flux_loop():
    model = flux_model()
    plain = flux_loop(model, streams="calls")
    hf_accel.apply(model, "w8a8(format=int8)+fora(interval=2)")
    out = flux_loop(model, streams="calls")
    assert all(torch.isfinite(v).all() for v in out) and not torch.equal(out[-1], plain[-1])
    assert cache_stats(model, "fora").reused > 0


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_layer_compiles_without_graph_breaks(fmt):
    """Plain torch: the whole layer (activation quantization included) is one graph, so apply, then compile."""
    import torch._dynamo

    q = W8A8Linear.from_module(torch.nn.Linear(32, 48), fmt)
    x = torch.randn(3, 7, 32)
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), q(x), atol=1e-5)
    torch._dynamo.reset()


# -- joint calibration --------------------------------------------------------------------------------------------
def test_joint_calibration_measures_against_the_unquantized_uncached_pipeline(tmp_path):
    labels, steps = list(range(4)), 8
    gens = lambda: [torch.Generator().manual_seed(5 + i) for i in range(4)]  # noqa: E731
    plain = digits_pipe()(class_labels=labels, num_inference_steps=steps, generator=gens(), output_type="pt").images
    pipe = digits_pipe()
    res = diffusion_calibrate(pipe, target_psnr=30.0, accel="w8a8", labels=labels, steps=steps, seed=5,
                              thresholds=(0.01, 0.05, 0.2), refine=1)
    assert res.reference == "plain" and res.met and 30.0 < res.quant_psnr < float("inf")
    assert hf_accel.get_config(pipe).names == ["w8a8", "fbcache"]
    # the cache gets only the budget quantization left: the combined PSNR vs plain is the one that meets the target
    joint = pipe(class_labels=labels, num_inference_steps=steps, generator=gens(), output_type="pt").images
    per_image = [psnr(a, b) for a, b in zip(joint, plain)]
    assert abs(sum(per_image) / len(per_image) - res.psnr) < 0.5 and res.psnr >= 30.0
    assert res.psnr <= res.quant_psnr + 1e-6 or res.threshold == 0
    assert pipe.__dict__["_hf_accel_metrics"][-1]["quant_psnr"] == res.quant_psnr  # goes on the saved card
    pipe.save_pretrained(tmp_path / "p")  # the calibrated threshold and the int8 weights save; reload is exact
    again = DigitsPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    assert hf_accel.get_config(again).plugins[1].threshold == res.threshold
    assert torch.equal(again(class_labels=labels, num_inference_steps=steps, generator=gens(), output_type="pt").images,
                       joint)
    assert "quant_psnr" in (tmp_path / "p" / "README.md").read_text()
    with pytest.raises(AccelError, match="needs a pipeline without accel"):
        diffusion_calibrate(pipe, target_psnr=30.0, accel="w8a8", labels=labels, steps=steps)


# -- ToMe -----------------------------------------------------------------------------------------------------------
def test_bipartite_merge_shapes_and_constant_tokens():
    x = torch.randn(2, 64, 8)
    merge, unmerge = bipartite_merge(x, 8, 8, 2, 32, torch.Generator().manual_seed(0))
    assert merge(x).shape == (2, 32, 8) and unmerge(merge(x)).shape == x.shape
    kept = unmerge(merge(x))
    assert (kept == x).all(-1).sum(1).min() >= 16  # unmerged sources come back as they were
    same = torch.ones(1, 64, 8)  # identical tokens: merging then unmerging changes nothing
    m, u = bipartite_merge(same, 8, 8, 2, 40, None)
    assert torch.equal(u(m(same)), same)


def test_tome_on_sd_pipeline_with_deepcache_and_remove():
    pipe = sd_pipe()
    ref = sd_images(pipe, batch=2)
    hf_accel.apply(pipe, "tome(ratio=0)")
    assert torch.equal(sd_images(pipe, batch=2), ref)
    hf_accel.remove(pipe)
    hf_accel.apply(pipe, "tome(ratio=0.5)+deepcache(interval=2)")
    assert hf_accel.get_config(pipe).names == ["tome", "deepcache"]
    out = sd_images(pipe, batch=2)
    assert torch.equal(out, sd_images(pipe, batch=2))  # seeded partition: runs repeat exactly
    assert 10 < psnr(out, ref) < float("inf")
    hf_accel.remove(pipe)
    assert torch.equal(sd_images(pipe, batch=2), ref) and no_hooks_left(pipe.unet)


def test_tome_refuses_unets_without_transformer_blocks():
    pipe = digits_pipe()
    with pytest.raises(UnsupportedModelError, match="BasicTransformerBlock"):
        hf_accel.apply(pipe, "tome")
    assert no_hooks_left(pipe.unet)


def test_tome_then_compile_blocks():
    import torch._dynamo

    pipe = sd_pipe()
    hf_accel.apply(pipe, "tome(ratio=0.5)")
    eager = sd_images(pipe, steps=2)
    torch._dynamo.reset()
    block = next(m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    block.compile(backend="eager")  # one block keeps the CPU test short; every block compiles the same way
    assert torch.allclose(sd_images(pipe, steps=2), eager, atol=1e-5)
    torch._dynamo.reset()


# -- Triton kernels (kernels/w8a8_act.py) under the interpreter, in a child process ---------------------------------
_CHILD = r"""
import json, torch
from hf_accel.kernels import w8a8_act as K
out = {}
g = torch.Generator().manual_seed(0)
for fmt in ("int8", "fp8"):
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(5, 70, generator=g) * torch.tensor([1e-3, 1, 10, 300, 0.2])[:, None]).to(dtype)
        x[2] = 0  # an all-zero token
        q, s = K.quantize_tokens(x, fmt)
        qr, sr = K.quantize_tokens_ref(x, fmt)
        out[f"q_{fmt}_{dtype}"] = [float((q.float() - qr.float()).abs().max()), float((s / sr - 1).abs().max()),
                                   str(q.dtype), list(q.shape), list(s.shape)]
acc = torch.randint(-2**20, 2**20, (37, 150), generator=g, dtype=torch.int32)
xs, ws, b = torch.rand(37, 1, generator=g), torch.rand(150, generator=g), torch.randn(150, generator=g)
for bias in (None, b):
    y = K.int8_epilogue(acc, xs, ws, bias, torch.bfloat16)
    yr = K.int8_epilogue_ref(acc, xs, ws, bias, torch.bfloat16)
    out[f"epi_{bias is None}"] = [float((y.float() - yr.float()).abs().max() / yr.float().abs().max()), str(y.dtype)]
print(json.dumps(out))
"""


def test_w8a8_kernels_match_their_references_under_the_interpreter():
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for fmt, code in (("int8", "torch.int8"), ("fp8", "torch.float8_e4m3fn")):
        for dtype in ("torch.float32", "torch.bfloat16"):
            diff, sdiff, qdtype, qshape, sshape = got[f"q_{fmt}_{dtype}"]
            assert diff == 0 and sdiff < 1e-6 and qdtype == code and qshape == [5, 70] and sshape == [5, 1], got
    for key in ("epi_True", "epi_False"):
        assert got[key][0] < 1e-2 and got[key][1] == "torch.bfloat16", got


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 17, 300])
def test_w8a8_op_on_cuda_matches_the_reference(fmt, m):
    """The CUDA path (Triton quantizer, torch._int_mm + Triton epilogue / torch._scaled_mm, small-M fallback) against
    the float32 reference of the same codes, in bf16, with a 1x1 conv and a bias."""
    from hf_accel.kernels.w8a8_act import w8a8_linear, w8a8_linear_ref

    lin = torch.nn.Linear(256, 384).cuda().bfloat16()
    q = W8A8Linear.from_module(lin, fmt)
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    y = w8a8_linear(x, q.weight, q.weight_scale, q.bias, fmt)
    ref = w8a8_linear_ref(x.float(), q.weight, q.weight_scale, q.bias.float(), fmt)
    assert y.dtype == torch.bfloat16 and float((y.float() - ref).norm() / ref.norm()) < 1e-2
    conv = torch.nn.Conv2d(64, 128, 1).cuda().bfloat16()
    qc = W8A8Linear.from_module(conv, fmt)
    xc = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
    assert float((qc(xc).float() - conv(xc).float()).norm() / conv(xc).float().norm()) < 0.08
