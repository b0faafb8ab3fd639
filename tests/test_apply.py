"""apply()/remove(): real changes on real architectures, atomic on failure, honest about what cannot be undone."""

import pytest
import torch

import hf_accel
from hf_accel.errors import AccelError, ConflictError, UnsupportedModelError

from conftest import build, module_types, sample_ids, state_hash


pytestmark = pytest.mark.usefixtures("plugin_doubles")


def test_int8_quantizes_every_linear_but_the_head(arch):
    model = build(arch)
    ids = sample_ids()
    ref = model(ids).logits
    hf_accel.apply(model, "int8")
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn", "down_proj", "c_proj", "mlp.c_fc"))}
    assert kinds == {"Int8Linear"}
    assert type(model.lm_head).__name__ == "Linear"
    out = model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.03, rel  # int8 per-channel: small but real error
    assert hf_accel.get_config(model).to_string() == "int8(skip=[lm_head], outliers=0.0, calibration_tokens=32768, calibration_seq_len=512, method=rtn)"
    assert model.config.quantization_config.plugins == [{"name": "int8", "options": {
        "skip": ["lm_head"], "outliers": 0.0, "calibration_tokens": 32768, "calibration_seq_len": 512, "method": "rtn"}}]


def test_failed_plugin_leaves_model_exactly_as_before():
    model = build("llama")
    hf_accel.apply(model, "scale_logits(factor=2)")
    before_hash, before_types = state_hash(model), module_types(model)
    before_generate = model.generate
    with pytest.raises(AccelError, match="plugin 'explode' failed .*boom.*left unchanged"):
        hf_accel.apply(model, "int8+explode")  # int8 succeeds first, then explode fails
    assert state_hash(model) == before_hash
    assert module_types(model) == before_types
    assert model.generate == before_generate
    assert hf_accel.get_config(model).names == ["scale_logits"]
    assert model.config.quantization_config.plugins[0]["name"] == "scale_logits"


def test_failure_on_a_fresh_model_leaves_no_trace():
    model = build("qwen2")
    before = state_hash(model)
    with pytest.raises(AccelError):
        hf_accel.apply(model, "explode")
    assert state_hash(model) == before
    assert not hf_accel.get_config(model)
    assert getattr(model.config, "quantization_config", None) is None


def test_checks_run_before_any_change():
    model = build("llama")
    before = state_hash(model)
    with pytest.raises(UnsupportedModelError, match="does not support LlamaForCausalLM .*accepts: diffusion_pipeline"):
        hf_accel.apply(model, "int8+diffusion_only")
    with pytest.raises(UnsupportedModelError, match="does not support Linear"):
        hf_accel.apply(torch.nn.Linear(4, 4), "scale_logits")
    assert state_hash(model) == before and not hf_accel.get_config(model)


def test_composes_across_calls_and_checks_conflicts_with_what_is_applied():
    model = build("mistral")
    hf_accel.apply(model, "int8")
    hf_accel.apply(model, "scale_logits(factor=2)")
    assert hf_accel.get_config(model).names == ["int8", "scale_logits"]
    with pytest.raises(ConflictError):
        hf_accel.apply(model, "otherquant")
    with pytest.raises(ConflictError, match="twice"):
        hf_accel.apply(model, "int8")


def test_remove_undoes_runtime_patches_and_reports_rewritten_weights():
    model = build("gemma")
    ids = sample_ids()
    ref = model(ids).logits
    hf_accel.apply(model, "scale_logits(factor=3)")
    assert torch.allclose(model(ids).logits, ref * 3)
    assert hf_accel.remove(model) == []
    assert torch.equal(model(ids).logits, ref) and not hasattr(model, "scaled_by")
    assert getattr(model.config, "quantization_config", None) is None

    hf_accel.apply(model, "int8+scale_logits")
    with pytest.warns(UserWarning, match="cannot be undone"):
        left = hf_accel.remove(model)
    assert left and all(line.startswith("int8:") for line in left)
    assert hf_accel.get_config(model).names == ["int8"]  # still true of the model, and still saved as such
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"
    out = model(ids).logits
    assert not torch.allclose(out, ref * 2)  # the logits hook is gone


def test_int8_dtype_and_generate(arch):
    model = build(arch).to(torch.bfloat16)
    hf_accel.apply(model, "int8")
    out = model.generate(sample_ids(1, 6), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)
    with pytest.raises(ValueError, match="not supported for quantized model"):
        model.float()  # transformers' own guard for models whose weights were rewritten
