"""A separately packaged plugin, pip-installed, is found through the entry-point group and used like a built-in."""

import importlib
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.registry import registry

from conftest import sample_ids

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "hf_accel_demo_plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(FIXTURE)],
        check=True,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    registry.reload()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("hf_accel_demo_plugin")]:
        del sys.modules[name]
    registry.reload()


def test_discovered_with_its_distribution_and_version(installed_plugin):
    info = registry.get("logit_softcap")
    assert (info.distribution, info.version) == ("hf-accel-demo-plugin", "0.3.0")
    assert "int8" in [i.name for i in hf_accel.list_plugins()]  # built-ins unaffected


def test_broken_plugin_is_reported_by_name_and_the_rest_work(installed_plugin):
    registry.get("int8")
    assert "demo_broken" in registry.broken and "a_module_that_does_not_exist" in registry.broken["demo_broken"]
    with pytest.raises(hf_accel.UnknownPluginError, match="'demo_broken' is installed but failed to import: ModuleNotFoundError"):
        hf_accel.AccelConfig.from_spec("demo_broken")


def test_used_through_accel_like_a_builtin(installed_plugin, saved_model, tmp_path):
    base_dir, plain = saved_model
    ids = sample_ids()
    ref = plain(ids).logits
    model = AutoModelForCausalLM.from_pretrained(base_dir, accel="int8+logit_softcap(cap=0.5)")
    out = model(ids).logits
    assert out.abs().max() <= 0.5 and not torch.allclose(out, ref)
    model.save_pretrained(tmp_path / "art")
    assert "hf-accel-demo-plugin 0.3.0" in (tmp_path / "art" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "art")
    assert hf_accel.get_config(reloaded).names == ["int8", "logit_softcap"]
    assert torch.equal(reloaded(ids).logits, out)
    with pytest.raises(hf_accel.OptionError, match="cap must be > 0"):
        hf_accel.apply(plain, "logit_softcap(cap=0)")


def test_blocked_by_environment(installed_plugin, monkeypatch):
    monkeypatch.setenv("HF_ACCEL_DISABLE_PLUGINS", "logit_softcap")
    registry.reload()
    try:
        with pytest.raises(hf_accel.UnknownPluginError):
            registry.get("logit_softcap")
    finally:
        monkeypatch.delenv("HF_ACCEL_DISABLE_PLUGINS")
        registry.reload()
