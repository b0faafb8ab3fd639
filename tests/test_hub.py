"""Accelerated models go to the Hub and come back as they were, through the real client over HTTP."""

import json

import pytest
import torch
from huggingface_hub import ModelCard, hf_hub_download
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.errors import ArtifactError

from conftest import build, sample_ids
from hub_server import local_hub_fixture

hub = local_hub_fixture()


def test_push_to_hub_then_from_pretrained_repo_id(hub):
    model = build("qwen2")
    hf_accel.apply(model, "int8")
    hf_accel.record_metric(model, {"metric": "weight_bytes", "value": 123, "model": "tiny-qwen2", "spec": "int8",
                                   "command": "pytest tests/test_hub.py", "date": "2026-11-24"})
    ids = sample_ids()
    expected = model(ids).logits
    model.push_to_hub("user/tiny-int8")

    card = ModelCard.load("user/tiny-int8")  # our card, not transformers' generic one
    assert card.data.hf_accel["spec"] == "int8(skip=[lm_head], outliers=0.0, calibration_tokens=32768, calibration_seq_len=512, method=rtn)"
    assert card.data.hf_accel["metrics"][0]["metric"] == "weight_bytes"
    assert "hf_accel" in card.data.tags

    reloaded = AutoModelForCausalLM.from_pretrained("user/tiny-int8")
    assert hf_accel.get_config(reloaded).names == ["int8"]
    assert torch.equal(reloaded(ids).logits, expected)

    with hub.offline():  # the cache layout serves the same artifact with no network
        offline = AutoModelForCausalLM.from_pretrained("user/tiny-int8")
        assert torch.equal(offline(ids).logits, expected)


def test_tampered_file_in_the_cache_is_refused(hub):
    model = build("llama")
    hf_accel.apply(model, "int8")
    model.push_to_hub("user/tampered")
    path = hf_hub_download("user/tampered", "model.safetensors")
    real = __import__("os").path.realpath(path)
    data = bytearray(open(real, "rb").read())
    data[-5] ^= 0xFF
    with open(real, "wb") as f:
        f.write(data)
    with pytest.raises(ArtifactError, match="SHA-256"):
        AutoModelForCausalLM.from_pretrained("user/tampered")


def test_plain_models_push_as_usual(hub):
    model = build("gpt2")
    model.push_to_hub("user/plain")
    config = json.loads(open(hf_hub_download("user/plain", "config.json")).read())
    assert "quantization_config" not in config
    assert torch.equal(AutoModelForCausalLM.from_pretrained("user/plain")(sample_ids()).logits, model(sample_ids()).logits)


def test_revision_and_local_files_only_with_accel(hub):
    from huggingface_hub import HfApi

    model = build("mistral")
    model.push_to_hub("user/base")  # plain checkpoint on main
    api = HfApi()
    api.create_branch("user/base", branch="v2")
    changed = build("mistral", seed=1)
    changed.push_to_hub("user/base", revision="v2")
    ids = sample_ids()
    on_v2 = AutoModelForCausalLM.from_pretrained("user/base", revision="v2", accel="int8")
    on_main = AutoModelForCausalLM.from_pretrained("user/base", accel="int8")
    assert hf_accel.get_config(on_v2).names == ["int8"]
    assert not torch.equal(on_v2(ids).logits, on_main(ids).logits)
    cached = AutoModelForCausalLM.from_pretrained("user/base", revision="v2", accel="int8", local_files_only=True)
    assert torch.equal(cached(ids).logits, on_v2(ids).logits)
