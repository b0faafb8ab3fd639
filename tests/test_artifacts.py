"""Artifacts: accel= on from_pretrained/pipeline, save → reload bit-identical, loud failures for bad artifacts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import hf_accel
from hf_accel.artifacts import GUARD_MESSAGE
from hf_accel.errors import ArtifactError, ConflictError, UnknownPluginError

from conftest import make_tokenizer, module_types, sample_ids


def test_save_and_reload_is_bit_identical(saved_model, tmp_path):
    base_dir, _ = saved_model
    model = AutoModelForCausalLM.from_pretrained(base_dir, accel="int8")
    ids = sample_ids()
    logits = model(ids).logits
    out = tmp_path / "artifact"
    model.save_pretrained(out)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_accel"
    assert config["layer_types"] == [GUARD_MESSAGE]
    assert "model.safetensors" in config["quantization_config"]["checksums"]
    card = (out / "README.md").read_text()
    assert "int8(skip=[lm_head], outliers=0.0, calibration_tokens=32768, calibration_seq_len=512, method=rtn)" in card and "hf_accel" in card

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # no accel=: the artifact says what it is
    assert hf_accel.get_config(reloaded) == hf_accel.get_config(model)
    assert module_types(reloaded) == module_types(model)
    assert torch.equal(reloaded(ids).logits, logits)
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)  # guard lifted


def test_reloaded_artifact_can_be_saved_again(saved_model, tmp_path):
    base_dir, _ = saved_model
    first = tmp_path / "a1"
    AutoModelForCausalLM.from_pretrained(base_dir, accel="int8").save_pretrained(first)
    second = tmp_path / "a2"
    AutoModelForCausalLM.from_pretrained(first).save_pretrained(second)
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert c1["quantization_config"]["guard"] == c2["quantization_config"]["guard"]
    ids = sample_ids()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(second)(ids).logits, AutoModelForCausalLM.from_pretrained(first)(ids).logits)


LOAD_WITHOUT_HF_ACCEL = textwrap.dedent(
    """
    import sys
    import transformers
    from transformers import AutoModelForCausalLM
    for arch, cls, path in zip(*[iter(sys.argv[1:])] * 3):
        for loader in (AutoModelForCausalLM, getattr(transformers, cls)):
            try:
                loader.from_pretrained(path)
            except Exception as e:
                print(arch, "REFUSED", type(e).__name__, str(e).replace("\\n", " "))
            else:
                print(arch, "LOADED")
    """
)
REFUSAL_ARCHS = ["llama", "gpt2"]


@pytest.fixture(scope="module")
def loaded_without_hf_accel(tmp_path_factory):
    """One child process without hf_accel tries to load the int8 artifact of each arch of REFUSAL_ARCHS, through
    AutoModelForCausalLM and through the model's own class (one interpreter start for all: most of the time)."""
    from conftest import build

    args = []
    for arch in REFUSAL_ARCHS:
        model = build(arch)
        hf_accel.apply(model, "int8")
        path = tmp_path_factory.mktemp(f"refused-{arch}") / "a"
        model.save_pretrained(path)
        args += [arch, type(model).__name__, str(path)]
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HF_ACCEL, *args], capture_output=True, text=True,
                            timeout=240)
    return result


@pytest.mark.parametrize("arch", REFUSAL_ARCHS)
def test_loading_without_hf_accel_fails_loudly(loaded_without_hf_accel, arch):
    result = loaded_without_hf_accel
    lines = [l.split(" ", 1)[1] for l in result.stdout.splitlines() if l.startswith(f"{arch} ")]
    lines = [l for l in lines if l.startswith(("REFUSED", "LOADED"))]
    assert len(lines) == 2 and all(l.startswith("REFUSED") for l in lines), result.stdout + result.stderr
    assert all("pip install hf-accel" in l and "import hf_accel" in l for l in lines)


def test_tampered_and_truncated_weights_are_refused(saved_model, tmp_path):
    base_dir, _ = saved_model
    out = tmp_path / "artifact"
    AutoModelForCausalLM.from_pretrained(base_dir, accel="int8").save_pretrained(out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in the tensor data: safetensors itself would load this silently
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        AutoModelForCausalLM.from_pretrained(out)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(out)


def test_artifact_naming_a_missing_plugin_is_refused(saved_model, tmp_path):
    base_dir, _ = saved_model
    out = tmp_path / "artifact"
    AutoModelForCausalLM.from_pretrained(base_dir, accel="int8").save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["plugins"].append({"name": "not_installed_plugin", "options": {}})
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="cannot restore .*unknown hf_accel plugin 'not_installed_plugin'"):
        AutoModelForCausalLM.from_pretrained(out)


def test_bad_specs_fail_before_loading(tmp_path, saved_model):
    from transformers import LlamaForCausalLM

    with pytest.raises(UnknownPluginError):  # before any file is looked at
        LlamaForCausalLM.from_pretrained(tmp_path / "does-not-exist", accel="int9")
    with pytest.raises(UnknownPluginError):  # Auto classes read config.json first, then fail before the weights
        AutoModelForCausalLM.from_pretrained(saved_model[0], accel="int9")


def test_foreign_quantization_config_is_refused_clearly(saved_model):
    base_dir, _ = saved_model
    with pytest.raises(ConflictError, match="cannot be combined with quantization_config=BitsAndBytesConfig"):
        AutoModelForCausalLM.from_pretrained(base_dir, accel="int8", quantization_config=BitsAndBytesConfig(load_in_8bit=True))


def test_usual_from_pretrained_arguments_still_work(tmp_path):
    from conftest import build

    build("llama").save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", accel="int8", dtype=torch.bfloat16, device_map="cpu", local_files_only=True
    )
    assert model.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    model.save_pretrained(tmp_path / "art")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "art", dtype=torch.bfloat16, device_map="cpu")
    ids = sample_ids()
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_pipeline_accel_does_not_leak_into_the_tokenizer(tmp_path):
    from transformers import pipeline

    from conftest import build

    build("llama").save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    for kwargs in ({"accel": "int8"}, {"model_kwargs": {"accel": "int8"}}):
        pipe = pipeline("text-generation", model=str(tmp_path / "m"), **kwargs)
        assert type(pipe.model.model.layers[0].self_attn.q_proj).__name__ == "Int8Linear"
        assert "accel" not in pipe.tokenizer.init_kwargs
        out = pipe("abc", max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"].startswith("abc")
    pipe.tokenizer.save_pretrained(tmp_path / "tok")
    assert "accel" not in (tmp_path / "tok" / "tokenizer_config.json").read_text()


@pytest.mark.gpu
def test_cuda_bf16_round_trip(tmp_path, arch):
    from conftest import build

    build(arch).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", accel="int8", dtype=torch.bfloat16, device_map="cuda")
    ids = sample_ids().cuda()
    logits = model(ids).logits
    assert logits.is_cuda and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "art")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "art", dtype=torch.bfloat16, device_map="cuda")
    assert torch.equal(again(ids).logits, logits)
    out = again.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 8)
