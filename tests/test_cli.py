"""The hf-accel command line: list, optimize, card, push, demo, and its errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.cli import main

from conftest import build, make_tokenizer, sample_ids
from hub_server import local_hub_fixture

hub = local_hub_fixture()


def test_list_shows_plugins_families_and_option_defaults(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "quantization" in out and "skip (list of str, default ('lm_head',))" in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "int8", "family": "quantization"}.items() <= next(r for r in rows if r["name"] == "int8").items()


def test_optimize_writes_an_artifact_that_reloads(tmp_path, capsys):
    build("llama").save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["optimize", str(tmp_path / "m"), "--accel", "int8", "--out", str(tmp_path / "art")]) == 0
    assert (tmp_path / "art" / "tokenizer.json").exists() and (tmp_path / "art" / "README.md").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "art")
    assert hf_accel.get_config(reloaded).names == ["int8"]


def test_bad_spec_is_an_error_message_not_a_traceback(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "nothing"), "--accel", "int9", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown hf_accel plugin 'int9'") and "Did you mean 'int8'" in err
    assert not (tmp_path / "o").exists()


def test_card_refresh_keeps_metrics(tmp_path):
    model = build("qwen2")
    hf_accel.apply(model, "int8")
    hf_accel.record_metric(model, {"metric": "ppl_change", "value": 0.01, "model": "m", "spec": "int8", "command": "x", "date": "d"})
    model.save_pretrained(tmp_path / "art")
    (tmp_path / "art" / "README.md").write_text((tmp_path / "art" / "README.md").read_text().replace("## Plugins", "## Plugins (stale)"))
    assert main(["card", str(tmp_path / "art"), "--repo-id", "me/art"]) == 0
    text = (tmp_path / "art" / "README.md").read_text()
    assert "(stale)" not in text and "ppl_change" in text and 'from_pretrained("me/art")' in text


def test_push_uploads_the_folder(tmp_path, hub):
    model = build("gpt2")
    hf_accel.apply(model, "int8")
    model.save_pretrained(tmp_path / "art")
    assert main(["push", str(tmp_path / "art"), "user/cli-art"]) == 0
    ids = sample_ids()
    assert torch.equal(AutoModelForCausalLM.from_pretrained("user/cli-art")(ids).logits, model(ids).logits)
    assert main(["push", str(tmp_path), "user/x"]) == 2  # not an artifact


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "hf_accel.cli", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "int8" in out.stdout


def test_demo_runs_and_shrinks_the_weights(capsys):
    from hf_accel.demo import run

    result = run(new_tokens=4)
    assert result["weight_ratio"] > 1.5
