"""Beyond one process: tensor parallelism (torchrun, 2 ranks, gloo on CPU) and device_map offload, each checked
against the single-process model (hf_accel.distributed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_accel
from hf_accel.distributed import check_tp, offload_reason, shard_model

HERE = os.path.dirname(__file__)
CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _save_models(root: str) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(f"{root}/float")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**{**CFG, "num_hidden_layers": 1})).save_pretrained(f"{root}/draft")
    for spec in ("int8", "fp8", "int4", "int4g64"):
        full = {"int4": "int4(group_size=32, method=rtn)", "int4g64": "int4(group_size=64, method=rtn)"}.get(spec, spec)
        AutoModelForCausalLM.from_pretrained(f"{root}/float", accel=full).save_pretrained(f"{root}/art-{spec}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """One torchrun of tests/tp_worker.py for every TP check (starting two processes costs most of the time)."""
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun not available")
    root = str(tmp_path_factory.mktemp("tp"))
    _save_models(root)
    out = os.path.join(root, "out")
    os.makedirs(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(HERE, "tp_worker.py"), root, out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    return ranks


def _each(tp_results, name):
    for rank, res in enumerate(tp_results):
        r = res[name]
        assert "error" not in r, f"rank {rank}: {r['error']}\n{r.get('trace', '')}"
        yield r


@pytest.mark.parametrize("spec", ["int8", "fp8", "int4"])
def test_transformers_tp_loads_artifact_slices(tp_results, spec):
    for r in _each(tp_results, f"hf_tp_artifact_{spec}"):
        assert r["max_diff"] < 1e-4
        assert r["same_generate"]
        local = r["o_proj_local"]  # row-wise: K split in two, the per-channel scale (int8/fp8) whole
        if spec == "int4":
            assert local["weight"] == [64, 32 // 8 * 1] or local["weight"] == [64, 4]
            assert local["weight_scale"] == [64, 1]
        else:
            assert local["weight"] == [64, 32] and local["weight_scale"] == [64]


def test_local_tp_then_quantize_matches_single_process(tp_results):
    for r in _each(tp_results, "local_tp_float_then_int4"):
        assert r["max_diff"] < 1e-4 and r["same_generate"]
        assert r["down_proj"] == [64, 64 // 8]  # K=128 split in two, 8 int4 per int32 word


def test_transformers_tp_then_accel(tp_results):
    for r in _each(tp_results, "hf_tp_float_then_int4"):  # group-wise: the local shards quantize identically
        assert r["max_diff"] < 1e-4 and r["same_generate"] and r["same_generate_h2o"]
    for r in _each(tp_results, "hf_tp_float_then_int8"):  # per-channel: a row-wise rank scales by its own K-slice
        assert r["max_diff"] < 1e-2 and r["same_generate"] and r["same_generate_h2o"]


@pytest.mark.parametrize("plugin", ["h2o", "sink", "snapkv", "kvquant", "fast", "lookup", "draft"])
def test_generate_under_tp_matches_single_process(tp_results, plugin):
    for r in _each(tp_results, f"generate_{plugin}"):
        assert r["hf_tp_same"] and r["local_tp_same"]


def test_bad_int4_split_refused_model_unchanged(tp_results):
    for r in _each(tp_results, "refuses_bad_int4_split"):
        assert r["refused"] and "whole int4 groups" in r["refused"] and r["unchanged"]
    for r in _each(tp_results, "hf_tp_refuses_bad_int4_artifact"):  # before any weight is read
        assert r["refused"] and "whole int4 groups" in r["refused"]


# --- single process ----------------------------------------------------------------------------------------------

def test_check_tp_messages():
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    hf_accel.apply(model, "int4(group_size=64, method=rtn)")
    o = model.model.layers[0].self_attn.o_proj
    with pytest.raises(hf_accel.UnsupportedModelError, match="multiple of 64 x 2"):
        check_tp(o, "o_proj", "rowwise", 2)
    check_tp(o, "o_proj", "colwise", 2)
    with pytest.raises(hf_accel.UnsupportedModelError, match="no tensor-parallel plan"):
        shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), rank=0, world=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("offload"))
    _save_models(root)
    return root


def _offload_map(model_path):
    """Half the layers on the CPU, the other half (and the head) offloaded to disk."""
    return {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_artifact_with_disk_offload_matches(saved, tmp_path, spec):
    pytest.importorskip("accelerate")
    ref = AutoModelForCausalLM.from_pretrained(f"{saved}/art-{spec}")
    off = AutoModelForCausalLM.from_pretrained(f"{saved}/art-{spec}", device_map=_offload_map(saved),
                                               offload_folder=str(tmp_path / "off"))
    assert "disk" in set(off.hf_device_map.values())
    ids = torch.randint(3, 120, (2, 9))
    with torch.no_grad():
        assert torch.allclose(off(ids).logits, ref(ids).logits, atol=1e-5)
        assert torch.equal(off.generate(ids, max_new_tokens=6, do_sample=False),
                           ref.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("spec", ["h2o(budget=8, recent=4)", "snapkv(budget=8, window=4, kernel=3)", "lookup(k=3)"])
def test_plugins_with_offload_match(saved, tmp_path, spec):
    pytest.importorskip("accelerate")
    ref = AutoModelForCausalLM.from_pretrained(f"{saved}/float", accel=spec)
    off = AutoModelForCausalLM.from_pretrained(f"{saved}/float", accel=spec, device_map=_offload_map(saved),
                                               offload_folder=str(tmp_path / "off"))
    ids = torch.randint(3, 120, (2, 12))
    with torch.no_grad():
        assert torch.equal(off.generate(ids, max_new_tokens=8, do_sample=False),
                           ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_weight_plugin_on_offloaded_model_refused(saved, tmp_path):
    pytest.importorskip("accelerate")
    off = AutoModelForCausalLM.from_pretrained(f"{saved}/float", device_map=_offload_map(saved),
                                               offload_folder=str(tmp_path / "off"))
    with pytest.raises(hf_accel.UnsupportedModelError, match="offloaded by device_map"):
        hf_accel.apply(off, "int8")
    assert type(off.model.layers[1].self_attn.o_proj) is torch.nn.Linear and not hf_accel.get_config(off)
    # the supported way: the artifact loads with offload (test_artifact_with_disk_offload_matches), plus KV plugins
    art = AutoModelForCausalLM.from_pretrained(f"{saved}/art-int8", device_map=_offload_map(saved),
                                               offload_folder=str(tmp_path / "off2"), accel="h2o(budget=8, recent=4)")
    ref = AutoModelForCausalLM.from_pretrained(f"{saved}/art-int8", accel="h2o(budget=8, recent=4)")
    ids = torch.randint(3, 120, (2, 12))
    assert torch.equal(art.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_fast_runtime_falls_back_under_offload(saved, tmp_path):
    pytest.importorskip("accelerate")
    ref = AutoModelForCausalLM.from_pretrained(f"{saved}/float")
    off = AutoModelForCausalLM.from_pretrained(f"{saved}/float", accel="fast", device_map=_offload_map(saved),
                                               offload_folder=str(tmp_path / "off"))
    assert "offloaded" in offload_reason(off)
    ids = torch.randint(3, 120, (1, 7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = off.generate(ids, max_new_tokens=6, do_sample=False)
    assert any("offloaded" in str(w.message) and "one device" in str(w.message) for w in caught)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=6, do_sample=False))
    assert offload_reason(ref) is None
