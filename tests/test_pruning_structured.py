"""shrink: structured pruning that really shrinks the config, reloads as a plain checkpoint, LoRA recovery."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.errors import AccelError, OptionError, UnsupportedModelError
from hf_accel.plugins.pruning.structured import plan, recover_lora, save_plain
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

CAL = "samples=4, seq_len=64, progress=false"


def test_config_shrinks_and_reloads_as_plain_checkpoint(tmp_path):
    model, tok = load_reference("tiny")
    params = sum(p.numel() for p in model.parameters())
    hf_accel.apply(model, f"shrink(ratio=0.5, {CAL})")
    c = model.config
    assert (c.intermediate_size, c.num_key_value_heads, c.num_attention_heads, c.head_dim) == (192, 2, 2, 32)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (192, 128)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 128)
    assert sum(p.numel() for p in model.parameters()) < params - 4 * (3 * 128 * 192 + 4 * 128 * 64) + 1
    ids = sample_ids(1, 16)
    with torch.no_grad():
        logits = model(ids).logits
    save_plain(model, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["intermediate_size"] == 192
    assert "structured-pruned" in (tmp_path / "plain" / "README.md").read_text()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert hf_accel.get_config(again).names == []
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    model.save_pretrained(tmp_path / "artifact")  # through accel=: an hf_accel artifact that reloads the same
    art = AutoModelForCausalLM.from_pretrained(tmp_path / "artifact")
    assert hf_accel.get_config(art).names == ["shrink"] and art.config.intermediate_size == 192
    with torch.no_grad():
        assert torch.equal(art(ids).logits, logits)


def test_scores_beat_weight_norms_and_recovery_helps():
    _, tok = load_reference("tiny")
    ppl = {}
    for score in ("weight", "activation", "lora"):
        model = load_reference("tiny")[0]
        hf_accel.apply(model, f"shrink(ratio=0.25, score={score}, samples=4, seq_len=64, progress=false)")
        ppl[score] = perplexity(model, tok, max_tokens=1024)["value"]
    assert ppl["activation"] < ppl["weight"] and ppl["lora"] < ppl["weight"], ppl
    rec = recover_lora(model, tok, steps=4, seq_len=64, batch_size=4, lr=1e-3, progress=False)
    assert rec["steps"] == 4 and not any(n for n, _ in model.named_modules() if "lora" in n)
    assert perplexity(model, tok, max_tokens=1024)["value"] < ppl["lora"]


def test_plan_respects_head_divisibility():
    from transformers import LlamaConfig

    base = LlamaConfig(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=3072,
                       head_dim=64)
    assert plan(base, 0.25, "both") == (2304, 4) and plan(base, 0.4, "both") == (1840, 2)
    assert plan(base, 0.4, "mlp") == (1840, 4) and plan(base, 0.4, "attention") == (3072, 2)


def test_rollback_and_errors(monkeypatch):
    model, _ = load_reference("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr("hf_accel.plugins.pruning.structured._slice_linear",
                        lambda lin, rows=None, cols=None, n=[0]: boom() if (n.__setitem__(0, n[0] + 1) or n[0]) > 5 else
                        torch.nn.Linear(1, 1))
    with pytest.raises(AccelError, match="left unchanged"):
        hf_accel.apply(model, "shrink(score=weight, progress=false)")
    assert model.config.intermediate_size == 384 and model.config.num_key_value_heads == 4
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(OptionError, match="ratio"):
        hf_accel.apply(model, "shrink(ratio=1.5)")
    with pytest.raises(UnsupportedModelError, match="Llama-style"):
        hf_accel.apply(build("gpt2"), "shrink")
