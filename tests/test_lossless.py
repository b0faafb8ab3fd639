"""`lossless`: the 12-bit exponent code is exact for every bf16 bit pattern, the Triton kernels (TRITON_INTERPRET=1
on CPU, a child process) match the references, and the plugin gives bit-identical logits, keeps poorly compressing
layers in bf16, and round-trips through save / reload / the loopback Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.errors import ConflictError, OptionError, UnsupportedModelError
from hf_accel.kernels import lossless as KL

from conftest import build, module_types, sample_ids, state_hash

SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 9.2e-41, 3e38, -1.0, 2.0, 65504.0]


def trained_like(n: int, k: int, seed: int = 0, specials: bool = True) -> torch.Tensor:
    """Heavy-tailed weights (Student-t) with row scales, plus +-0, subnormals, inf, NaNs with payloads."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((n, k)) * 0.02 * (1 + 2 * torch.rand(n, 1, generator=g))
    w = w.to(torch.bfloat16)
    if specials:
        flat = w.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: 2 * len(SPECIALS)]
        flat[idx[: len(SPECIALS)]] = torch.tensor(SPECIALS).to(torch.bfloat16)
        bits = flat.view(torch.int16)
        bits[idx[len(SPECIALS)]] = 0x7FC1  # NaN with a payload
        bits[idx[len(SPECIALS) + 1]] = -1  # 0xFFFF: negative NaN, all payload bits set
    return w


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


# -- the format ---------------------------------------------------------------------------------------------------
def test_every_bf16_bit_pattern_round_trips():
    """All 65,536 patterns (both zeros, every subnormal, inf, every NaN payload) in one [256, 256] tensor."""
    w = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    w = w[:, torch.randperm(256, generator=torch.Generator().manual_seed(0))].contiguous()
    parts = KL.encode(w, cap=256 * 256)
    assert int(parts["ptr"][-1]) == 256 * 256 - 16 * 256  # every pattern outside the 16-exponent window
    assert same_bits(KL.decode_ref(**parts), w)


def test_trained_like_weights_encode_exactly_with_few_escapes():
    w = trained_like(96, 384)
    hist = KL.exponent_histogram(w)
    base, covered = KL.best_window(hist)
    n_esc = KL.escape_count(hist, base)
    assert 0 < n_esc < 0.01 * w.numel()  # the specials (zeros, subnormals, inf, nan, large) plus the tails
    parts = KL.encode(w, cap=KL.capacity(96, 384, 0.01))
    assert int(parts["ptr"][-1]) == n_esc and int(parts["base"]) == base
    assert parts["sm"].dtype == parts["code"].dtype == torch.uint8 and parts["code"].shape == (96, 192)
    assert same_bits(KL.decode_ref(**parts), w)
    # layout: byte j of a row holds the codes of columns j (low nibble) and j + K/2 (high nibble)
    exp = (KL.bf16_bits(w) >> 7) & 0xFF
    r, j = 5, 17
    for col, nib in ((j, int(parts["code"][r, j]) & 15), (j + 192, int(parts["code"][r, j]) >> 4)):
        e = int(exp[r, col])
        assert nib == (e - base if base <= e < base + 16 else 0)  # escapes: placeholder code 0


def test_capacity_overflow_and_bad_shapes_raise():
    w = trained_like(8, 64)
    with pytest.raises(ValueError, match="exceed the capacity"):
        KL.encode(w, cap=1)
    with pytest.raises(ValueError, match="even number of columns"):
        KL.encode(trained_like(8, 63, specials=False), cap=100)
    with pytest.raises(TypeError, match="bf16"):
        KL.encode(torch.randn(4, 8), cap=10)


def test_sizes_and_entropy_layout():
    assert 12.0 < KL.format_bits_per_weight(4096, 4096, KL.DEFAULT_MAX_ESCAPE_RATE) < 12.04  # 24.8% smaller
    w = trained_like(128, 512, specials=False)
    hist = KL.exponent_histogram(w)
    ent = KL.entropy_bits(hist)
    huff = KL.huffman_bits_per_weight(hist)
    assert 2.0 < ent < 3.5 and ent <= huff - 8 < ent + 1  # Huffman is within a bit of the entropy
    lengths = KL.huffman_lengths(hist)
    assert sum(2.0 ** -l for l in lengths.values()) <= 1 + 1e-12  # a prefix code (Kraft)


def test_reference_linear_is_f_linear_bit_for_bit():
    w = trained_like(40, 128, specials=False)
    parts = KL.encode(w, cap=64)
    x = torch.randn(3, 128).to(torch.bfloat16)
    b = torch.randn(40).to(torch.bfloat16)
    y = KL.lossless_linear(x, *(parts[k] for k in ("sm", "code", "base", "ptr", "col", "val")), b, False)
    assert same_bits(y, torch.nn.functional.linear(x, w, b))


# -- kernels under the interpreter --------------------------------------------------------------------------------
# (kernel, M, N, K, config overrides): N not a multiple of the row block, K/2 not a multiple of the K block
CPU_CASES = [
    ("gemv", 1, 37, 200, dict(block_n=8, block_k=32, num_warps=1)),
    ("gemv", 2, 20, 128, dict(block_n=4, block_k=64, num_warps=1)),
    ("dot", 3, 21, 96, dict(block_n=16, block_k=16, block_m=16, num_warps=1)),
    ("dot", 5, 40, 200, dict(block_n=16, block_k=32, block_m=16, num_warps=1)),
    ("decode", 0, 19, 78, {}),
    ("op", 1, 24, 64, {}),
    ("op", 4, 24, 64, {}),
    ("op", 20, 24, 64, {}),
]


def case_id(case) -> str:
    kernel, m, n, k, cfg = case
    return f"{kernel}-m{m}-n{n}-k{k}" + ("-" + ",".join(f"{a}={b}" for a, b in cfg.items()) if cfg else "")


def run_case(case, device: str, seed: int = 0) -> dict:
    from hf_accel.kernels._base import LaunchConfig

    kernel, m, n, k, overrides = case
    w = trained_like(n, k, seed, specials=False)
    idx = torch.linspace(0, w.numel() - 1, 5).long()
    w.view(-1)[idx] = torch.tensor([1e30, -1e-30, 0.0, 5e-40, -2.5]).to(torch.bfloat16)  # escapes, 0, subnormal
    parts = KL.encode(w, cap=KL.capacity(n, k, 0.05))
    args = [parts[key].to(device) for key in ("sm", "code", "base", "ptr", "col", "val")]
    out = {"id": case_id(case), "escapes": int(parts["ptr"][-1])}
    if kernel == "decode":
        got = KL.ll_decode(*args).cpu()
        out["bit_exact"] = same_bits(got, w)
        return out
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16) if n % 2 else None
    ref64 = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    xd = x.to(device)
    bd = bias.to(device) if bias is not None else None
    if kernel == "op":
        y = KL.lossless_linear(xd, *args, bd, False)
        exact = KL.lossless_linear(xd, *args, bd, True).cpu()
        out["exact_is_f_linear"] = same_bits(exact, torch.nn.functional.linear(x, w, bias))
    else:
        cfg = LaunchConfig(**{**dict(block_n=16, block_k=64, block_m=1, num_warps=4, num_stages=1), **overrides})
        poison = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
        y = (KL.ll_gemv if kernel == "gemv" else KL.ll_dot)(xd, *args, bd, cfg, out=poison)
    y = y.cpu()
    out["unwritten"] = int(y.isnan().sum())
    out["rel_err"] = ((y.double() - ref64).norm() / ref64.norm()).item()
    # how far from the correctly rounded bf16 result, in units of its last place
    ulp = (ref64.abs().clamp(min=1e-30).log2().floor() - 7).exp2()
    out["max_ulp"] = ((y.double() - ref64).abs() / ulp).max().item()
    out["shape"] = list(y.shape)
    return out


def escapes_control(device: str) -> float:
    """The GEMV with the escape pass switched off (ptr all zero) must be visibly wrong: the check sees escapes."""
    w = trained_like(16, 128, specials=False)
    w[:, 3] = 40.0  # one large escape per row
    parts = KL.encode(w, cap=64)
    parts["ptr"].zero_()
    args = [parts[key].to(device) for key in ("sm", "code", "base", "ptr", "col", "val")]
    x = torch.randn(1, 128).to(torch.bfloat16)
    y = KL.ll_gemv(x.to(device), *args, None).cpu().double()
    ref = x.double() @ w.double().T
    return ((y - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_interpreted_kernel_matches_reference(interpreted, case):
    got = interpreted["cases"][case_id(case)]
    assert got["escapes"] > 0
    if case[0] == "decode":
        assert got["bit_exact"], got
        return
    assert got["unwritten"] == 0, got
    # fp32 accumulation, one rounding to bf16: within one bf16 ulp of the exact (float64) result. (The interpreter
    # rounds fp32 -> bf16 toward zero, so errors reach ~1 ulp here; decode + F.linear stays within 1/2 ulp.)
    assert got["rel_err"] < 8e-3, got
    assert got["max_ulp"] <= 1.0 + 1e-9, got
    if case[0] == "op":
        assert got["exact_is_f_linear"], got
    kernel, m, n, k, _ = case
    assert got["shape"] == [m, n]


def test_interpreted_check_sees_the_escapes(interpreted):
    assert interpreted["escapes_control"] > 0.5, interpreted["escapes_control"]


# -- the plugin -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bf16():
    from hf_accel.quality.reference import reference_path

    return AutoModelForCausalLM.from_pretrained(reference_path("tiny"), dtype=torch.bfloat16).eval()


def tiny_ids(batch=2, length=16, seed=0):
    return torch.randint(3, 4096, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_tiny_reference_logits_and_generate_are_bit_identical(tiny_bf16):
    import copy

    model = copy.deepcopy(tiny_bf16)
    ids = tiny_ids()
    ref = model(ids).logits
    ref_gen = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    hf_accel.apply(model, "lossless")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "LosslessLinear"
    assert type(model.lm_head).__name__ == "Linear"  # tied to the embedding: reported and kept
    plugin = hf_accel.get_config(model).plugins[0]
    assert plugin.keep == ("lm_head",)
    assert {r["layer"]: r["reason"] for r in plugin.report}["lm_head"].startswith("weight tied to")
    for layer in (m for m in model.modules() if type(m).__name__ == "LosslessLinear"):
        assert same_bits(layer.dequantize(), tiny_bf16.get_submodule(
            next(n for n, x in model.named_modules() if x is layer)).weight)
    assert torch.equal(model(ids).logits, ref)
    assert torch.equal(model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False), ref_gen)
    sizes = plugin.sizes(model)
    assert sizes["lossless_layers"] == 28 and 12.0 < sizes["bits_per_weight"] < 12.3, sizes  # K = 128: row pointers 0.25
    rows = [r for r in plugin.report if r["decision"] == "lossless"]
    assert all(r["window_coverage"] > 0.999 and r["window_coverage"] <= r["top15_coverage"] for r in rows)
    assert all(10.3 < r["huffman_bits_per_weight"] < 11.0 for r in rows)  # DFloat11's ~11 bits


def test_poorly_compressing_layer_is_reported_and_kept(tiny_bf16):
    import copy

    model = copy.deepcopy(tiny_bf16)
    with torch.no_grad():  # exponents spread over ~60 binades: far more escapes than the budget
        w = model.model.layers[1].self_attn.q_proj.weight
        w.copy_((torch.randn_like(w, dtype=torch.float32) * torch.exp2(torch.randint(-40, 20, w.shape).float())).to(w.dtype))
    ids = tiny_ids()
    ref = model(ids).logits
    hf_accel.apply(model, "lossless")
    plugin = hf_accel.get_config(model).plugins[0]
    assert plugin.keep == ("lm_head", "model.layers.1.self_attn.q_proj")
    row = next(r for r in plugin.report if r["layer"] == "model.layers.1.self_attn.q_proj")
    assert row["decision"] == "bf16" and "compresses poorly" in row["reason"]
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "Linear"
    assert torch.equal(model(ids).logits, ref)


def test_float32_model_is_refused_unchanged(tiny_bf16):
    model = build("llama")  # float32
    before = state_hash(model)
    with pytest.raises(UnsupportedModelError, match="dtype=torch.bfloat16"):
        hf_accel.apply(model, "lossless")
    assert state_hash(model) == before and not hf_accel.get_config(model)


def test_options_and_conflicts():
    with pytest.raises(OptionError, match="max_escape_rate"):
        hf_accel.AccelConfig.from_spec("lossless(max_escape_rate=0.5)")
    with pytest.raises(ConflictError):
        hf_accel.AccelConfig.from_spec("lossless+int8")


def test_save_reload_bit_identical_and_exact_option(tiny_bf16, tmp_path):
    import copy

    model = copy.deepcopy(tiny_bf16)
    ids = tiny_ids()
    ref = model(ids).logits
    hf_accel.apply(model, "lossless(exact=true)")
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    saved = config["quantization_config"]["plugins"][0]
    assert saved["name"] == "lossless" and saved["options"]["keep"] == ["lm_head"] and saved["options"]["exact"]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "lossless_bits_per_weight" in card and "lossless_size_vs_bf16" in card
    size = (tmp_path / "a" / "model.safetensors").stat().st_size
    tiny_bf16.save_pretrained(tmp_path / "plain")
    plain = (tmp_path / "plain" / "model.safetensors").stat().st_size
    sizes = hf_accel.get_config(model).plugins[0].sizes(model)
    assert plain - size > 0.2 * sizes["bf16_bytes"]  # linears -23.5% (K=128), minus header; tied embedding stays bf16

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert hf_accel.get_config(reloaded) == hf_accel.get_config(model)
    assert module_types(reloaded) == module_types(model)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert torch.equal(reloaded(ids).logits, ref)
    assert reloaded.model.layers[0].mlp.up_proj.exact


hub = None
try:
    from hub_server import local_hub_fixture

    hub = local_hub_fixture()
except Exception:  # pragma: no cover
    pass


def test_push_to_hub_and_back(hub, tiny_bf16):
    import copy

    from huggingface_hub import ModelCard

    model = copy.deepcopy(tiny_bf16)
    ids = tiny_ids()
    ref = model(ids).logits
    hf_accel.apply(model, "lossless")
    model.push_to_hub("user/tiny-lossless")
    card = ModelCard.load("user/tiny-lossless")
    assert "hf_accel-lossless" in card.data.tags
    assert any(m["metric"] == "lossless_size_vs_bf16" for m in card.data.hf_accel["metrics"])
    reloaded = AutoModelForCausalLM.from_pretrained("user/tiny-lossless")
    assert hf_accel.get_config(reloaded).names == ["lossless"]
    assert torch.equal(reloaded(ids).logits, ref)


# -- CUDA ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", CPU_CASES + [("gemv", 1, 4096, 4096, {}), ("dot", 16, 1024, 4096, {}),
                                              ("dot", 4, 14336, 4096, {}), ("decode", 0, 4096, 14336, {}),
                                              ("op", 1, 1000, 1000, {}), ("op", 7, 1000, 1000, {}),
                                              ("op", 100, 1000, 1000, {})], ids=case_id)
def test_gpu_kernel_matches_reference(case):
    for seed in (0, 1):
        got = run_case(case, "cuda", seed)
        if case[0] == "decode":
            assert got["bit_exact"], got
            continue
        assert got["unwritten"] == 0 and got["max_ulp"] <= 1.0 + 1e-9, got
        if case[0] == "op":
            assert got["exact_is_f_linear"], got


@pytest.mark.gpu
def test_gpu_tiny_reference_greedy_and_exact_logits(tiny_bf16):
    import copy

    model = copy.deepcopy(tiny_bf16).cuda()
    ids = tiny_ids().cuda()
    ref = model(ids).logits
    gen = model.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)
    ref1 = model(ids[:1, :1]).logits
    exact = copy.deepcopy(model)
    hf_accel.apply(exact, "lossless(exact=true)")
    assert torch.equal(exact(ids).logits, ref)  # decode + cuBLAS: bit-identical by construction
    assert torch.equal(exact.generate(ids[:1, :8], max_new_tokens=16, do_sample=False), gen)
    hf_accel.apply(model, "lossless")
    assert torch.equal(model(ids).logits, ref)  # prefill rows > 16: the decode path
    one = model(ids[:1, :1]).logits  # one row: the fused GEMV, fp32 accumulation in its own order
    diff = (one.float() - ref1.float()).abs().max().item()
    assert diff <= 0.02 * ref.abs().max().item(), diff  # a last-bit difference at most, not a wrong weight
    got = model.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)
    assert (got == gen).float().mean() > 0.9  # greedy agreement (a near-tie can flip on a last-bit difference)


if __name__ == "__main__":  # the child process of `interpreted`: TRITON_INTERPRET=1 is already set
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    results = {c["id"]: c for c in (run_case(case, "cpu") for case in CPU_CASES)}
    print(json.dumps({"cases": results, "escapes_control": escapes_control("cpu")}))
