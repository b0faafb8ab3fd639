"""prune: magnitude / Wanda / SparseGPT, unstructured and N:M, on the tiny reference model; 2:4 compressed storage,
artifacts that reload exactly, atomic apply, the published quality ordering where tiny can show it."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.errors import AccelError, OptionError
from hf_accel.plugins.pruning import calibration as cal
from hf_accel.plugins.pruning.methods import nm_mask, score_mask, sparsegpt
from hf_accel.plugins.pruning.sparse24 import Sparse24Linear, compress_24, decompress_24
from hf_accel.quality import load_reference
from hf_accel.quality.corpus import token_stream
from hf_accel.quality.perplexity import sliding_window_nll

_HELDOUT = {}


def perplexity(model, tok, max_tokens):
    """Held-out perplexity like hf_accel.quality.perplexity, with the held-out tokens tokenized once per session."""
    if max_tokens not in _HELDOUT:
        _HELDOUT[max_tokens] = token_stream(tok, "heldout", max_tokens)
    nll, n = sliding_window_nll(model, _HELDOUT[max_tokens], 256, 256)
    return {"value": float(torch.tensor(nll / n).exp())}

from conftest import build, sample_ids

CAL = "samples=8, seq_len=128, progress=false"


def tiny():
    return load_reference("tiny")[0]


def prunable(model):
    _, layers = cal.decoder_layers(model)
    return [m for layer in layers for m in layer.modules() if isinstance(m, (torch.nn.Linear, Sparse24Linear))]


def dense(m):
    return m.dense_weight() if isinstance(m, Sparse24Linear) else m.weight


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_exact(n, m):
    keep = nm_mask(torch.randn(16, 64), n, m)
    assert (keep.reshape(16, -1, m).sum(-1) == n).all()


def test_compress_24_roundtrip():
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    keep = nm_mask(w.float().abs(), 2, 4)
    values, meta = compress_24(w * keep, keep)
    assert values.shape == (32, 32) and meta.shape == (32, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), w * keep)
    lin = Sparse24Linear.from_dense(w * keep, keep, torch.randn(32, dtype=torch.bfloat16))
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w * keep, lin.bias))


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    """On one layer's real calibration inputs: SparseGPT's output error < magnitude's; Wanda < magnitude where the
    input columns' norms differ a lot (down_proj); the error is what these methods minimise."""
    model = tiny()
    _, layers = cal.decoder_layers(model)
    ids = cal.calibration_ids(model, cal.load_tokenizer(model, None), 8, 128)
    lin = layers[2].mlp.down_proj
    xs = []
    h = lin.register_forward_pre_hook(lambda mod, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    st = cal.collect(model, layers[2], {"down": lin}, ids, 8, hessian=True)["down"]
    h.remove()
    x, W = torch.cat(xs), lin.weight.detach()
    err = lambda w: ((x @ (W - w).T).norm() / (x @ W.T).norm()).item()
    for nm in (None, (2, 4)):
        e_mag = err(score_mask(W, 0.5, nm, None)[0])
        e_wanda = err(score_mask(W, 0.5, nm, st.act_norm)[0])
        e_sgpt = err(sparsegpt(W, st.H, 0.5, nm)[0])
        assert e_sgpt < 0.7 * e_mag and e_wanda < e_mag, (nm, e_mag, e_wanda, e_sgpt)


@pytest.mark.parametrize("spec,zeros", [("prune(method=magnitude, pattern=4:8, progress=false)", 0.5),
                                        (f"prune(method=wanda, sparsity=0.6, {CAL})", 0.6),
                                        (f"prune(method=sparsegpt, pattern=2:4, {CAL})", 0.5)])
def test_sparsity_and_patterns_exact(spec, zeros):
    model = tiny()
    hf_accel.apply(model, spec)
    lins = prunable(model)
    assert len(lins) == 4 * 7
    for m in lins:
        w = dense(m)
        assert abs((w == 0).float().mean().item() - zeros) < 0.01
        if "pattern=4:8" in spec:
            assert ((w.reshape(w.shape[0], -1, 8) != 0).sum(-1) <= 4).all()
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()  # skipped by default
    if "2:4" in spec:
        assert all(isinstance(m, Sparse24Linear) for m in lins)


def test_quality_script_ordering_on_tiny(tmp_path):
    """scripts/quality_pruning.py on tiny: the published ordering SparseGPT < magnitude at 2:4, and a damaged
    method (magnitude at 2:4) is measurably worse than the dense model. Wanda is not asserted: on tiny it scores
    like magnitude or worse (tiny's activations have no outlier features; the layer-level test above shows Wanda's
    gain where input norms differ)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import quality_pruning
    from hf_accel.quality.reference import ASSETS

    res = quality_pruning.run(str(ASSETS / "tiny"), "cpu", smoke=True,
                              variants=["magnitude_2:4", "sparsegpt_2:4"], structured=False, out=tmp_path / "q.json")
    s = res["summary"]
    assert s["sparsegpt_beats_magnitude_2_4"] and s["rel_change_magnitude_2_4"] > 0.03, s
    assert 0 < s["rel_change_sparsegpt_2_4"] < s["rel_change_magnitude_2_4"] * 0.8, s
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["summary"]["dense_ppl"] == s["dense_ppl"] and saved["records"][0]["metric"] == "heldout_perplexity"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse24_kernels_on_cuda():
    """On CUDA in bf16, Sparse24Linear runs the Triton 2:4 kernel (1, 32 rows) and the semi-structured kernels
    (2048 rows) and matches the dense product."""
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    keep = nm_mask(w.float().abs(), 2, 4)
    lin = Sparse24Linear.from_dense(w * keep, keep, torch.randn(256, device="cuda", dtype=torch.bfloat16))
    for rows in (1, 32, 2048):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), (w * keep).float(), lin.bias.float())
        assert ((lin(x).float() - ref).norm() / ref.norm()).item() < 1e-2
    assert lin._sparse is not None, lin._sparse_error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prune_24_bf16_cuda_roundtrip(tmp_path):
    """Both CUDA paths: 2x16 tokens (<= kernel_rows) through the Triton 2:4 kernel, 2x40 through the semi-structured
    tensors; the artifact reloads to identical logits on each."""
    model = load_reference("tiny", device="cuda", dtype=torch.bfloat16)[0]
    hf_accel.apply(model, f"prune(method=sparsegpt, pattern=2:4, {CAL})")
    small, large = sample_ids(2, 16).cuda(), sample_ids(2, 40).cuda()
    with torch.no_grad():
        before_small = model(small).logits
        assert all(m._sparse is None for m in prunable(model))  # the kernel needs no semi-structured copy
        before_large = model(large).logits
    assert all(m._sparse is not None for m in prunable(model)), [m._sparse_error for m in prunable(model)][:1]
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        assert torch.equal(again(small).logits, before_small)
        assert torch.equal(again(large).logits, before_large)


@pytest.mark.parametrize("spec", [f"prune(method=sparsegpt, pattern=2:4, {CAL})", "prune(method=magnitude, progress=false)"])
def test_artifact_roundtrip(tmp_path, spec):
    model = tiny()
    hf_accel.apply(model, spec)
    ids = sample_ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    sizes = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert hf_accel.get_config(again).names == ["prune"]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)
    if "2:4" in spec:
        assert all(isinstance(m, Sparse24Linear) for m in prunable(again))
        dense_bytes = sum(p.numel() * 4 for p in tiny().parameters())
        assert sizes < 0.85 * dense_bytes  # compressed 2:4 storage of the 28 linears


def test_failure_rolls_back(monkeypatch):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return sparsegpt(*a, **k)

    monkeypatch.setattr("hf_accel.plugins.pruning.prune.sparsegpt", failing)
    with pytest.raises(AccelError, match="left unchanged"):
        hf_accel.apply(model, f"prune(method=sparsegpt, {CAL})")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hf_accel.get_config(model).names == []


def test_options_checked():
    with pytest.raises(OptionError, match="pattern=2:4 fixes sparsity"):
        hf_accel.apply(tiny(), "prune(pattern=2:4, sparsity=0.7)")
    with pytest.raises(OptionError, match="storage=sparse24 needs pattern=2:4"):
        hf_accel.apply(tiny(), "prune(storage=sparse24)")
    with pytest.raises(AccelError, match="tokenizer"):
        hf_accel.apply(build("llama"), "prune(method=wanda, progress=false)")


def test_other_architecture_with_explicit_tokenizer():
    model = build("qwen2")  # biased q/k/v, vocabulary smaller than the tokenizer's
    hf_accel.apply(model, f"prune(method=wanda, pattern=2:4, tokenizer=reference/tiny, {CAL})")
    assert all(isinstance(m, Sparse24Linear) and m.bias is not None or m.bias is None for m in prunable(model))
    assert model(sample_ids()).logits.isfinite().all()
