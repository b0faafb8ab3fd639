"""Medusa heads (issue 7): training with the base frozen, the heads artifact, tree verification (greedy identity)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import VOCAB, build

import hf_accel
from hf_accel.errors import AccelError, ArtifactError, OptionError
from hf_accel.plugins.speculative.medusa import (MedusaHeads, build_tree, load_heads, parse_tree, save_heads,
                                                 train_medusa)


@pytest.fixture(scope="module")
def tiny():
    from hf_accel.quality.reference import load_reference

    try:
        return load_reference("tiny")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"tiny reference model not built: {e}")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    model, tok = tiny
    torch.manual_seed(0)
    heads, losses = train_medusa(model, tok, heads=3, steps=40, seq_len=48, batch=8, lr=3e-3)
    path = tmp_path_factory.mktemp("medusa") / "heads"
    save_heads(heads, path, base_model="tiny", training={"steps": 40})
    return heads, losses, path


def _texts():
    return ["import os\nimport sys\n\ndef main(", "class Foo:\n    def __init__(self", "for i in range(", "# ",
            "def f(x):\n    return ", "    if not ", "from collections import ", "try:\n    import ",
            "raise ValueError(", "    def __repr__(self):\n        return ", "with open(", "self.assertEqual(",
            "__all__ = [", "    for key, value in ", "#!/usr/bin/env python", "return self._", "elif ",
            "    except ", "print(", "x = [i for i in "]


def test_heads_train_loss_decreases(trained):
    _, losses, _ = trained
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_artifact_round_trip(trained):
    heads, _, path = trained
    assert {p.name for p in path.iterdir()} >= {"medusa_config.json", "medusa_heads.safetensors", "README.md"}
    config = json.loads((path / "medusa_config.json").read_text())
    assert config["num_heads"] == 3 and config["base_model"] == "tiny"
    assert "medusa" in (path / "README.md").read_text()
    loaded, _ = load_heads(str(path))
    for (k, a), (k2, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a.cpu(), b)


def test_greedy_identical_on_tiny_and_accepts(tiny, trained):
    model, tok = tiny
    _, _, path = trained
    kw = dict(max_new_tokens=24, do_sample=False)
    encs = [tok([t], return_tensors="pt") for t in _texts()]
    refs = [model.generate(**e, **kw) for e in encs]
    hf_accel.apply(model, f"medusa(heads='{path}')")
    try:
        steps = accepted = 0
        for e, ref in zip(encs, refs):
            out = model.generate(**e, **kw)
            assert torch.equal(out, ref)
            stats = model.hf_accel_spec_stats
            steps, accepted = steps + stats["steps"], accepted + stats["accepted"]
        assert (accepted + steps) / steps > 1.3  # mean accepted length (tokens per verify step) > 1
        assert accepted / steps > 0.25  # 40 training steps on CPU give ~0.47
    finally:
        hf_accel.remove(model)
    assert "generate" not in vars(model) or not hasattr(model, "hf_accel_spec_stats")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tree", ["default", "3,2,1"])
def test_greedy_identical_random_models(arch, tree, tmp_path):
    model = build(arch)
    heads = MedusaHeads(model.config.hidden_size, 3)
    with torch.no_grad():
        for block in heads.blocks:
            block.weight.normal_(0, 0.05)
    save_heads(heads, tmp_path / "h")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (1, int(n)), generator=g) for n in torch.randint(2, 12, (6,), generator=g)]
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    refs = [model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw) for p in prompts]
    hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h'}', tree='{tree}')")
    for p, ref in zip(prompts, refs):
        assert torch.equal(model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw), ref)


def test_tree_shapes():
    paths = parse_tree("2,2", 3)
    assert paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1))
    tree = build_tree(paths)
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2]
    assert tree.visible[5].tolist() == [True, False, True, False, False, True, False]
    assert all(len(p) <= 2 for p in parse_tree("default", 2))


def test_bad_options_and_batches(tmp_path):
    model = build("llama")
    with pytest.raises(OptionError, match="needs option 'heads'"):
        hf_accel.apply(model, "medusa")
    with pytest.raises(OptionError, match="tree"):
        hf_accel.apply(model, "medusa(heads='x', tree='3,zero')")
    with pytest.raises(ArtifactError):
        hf_accel.apply(model, f"medusa(heads='{tmp_path / 'missing'}')")
    save_heads(MedusaHeads(model.config.hidden_size, 2), tmp_path / "h2")
    with pytest.raises(OptionError, match="at most one per head"):
        hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h2'}', tree='2,2,2')")
    save_heads(MedusaHeads(32, 2), tmp_path / "h32")
    with pytest.raises(AccelError, match="hidden size"):
        hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h32'}')")
    assert "generate" not in vars(model)  # refused specs leave the model unchanged
    hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h2'}')")
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(OptionError, match="batch size 1"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with warnings.catch_warnings(record=True) as w:  # sampling falls back to transformers' loop
        warnings.simplefilter("always")
        model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=True)
    assert any("sampling" in str(x.message) for x in w)


def test_train_script_cpu(tmp_path):
    import importlib.util
    from pathlib import Path

    from hf_accel.quality.reference import reference_path

    try:
        base = reference_path("tiny")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(str(e))
    spec = importlib.util.spec_from_file_location("train_medusa", Path(__file__).parents[1] / "scripts/train_medusa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--model", str(base), "--out", str(tmp_path / "o"), "--heads", "2", "--steps", "3", "--seq-len", "16",
              "--batch", "2", "--device", "cpu"])
    assert load_heads(str(tmp_path / "o"))[0].num_heads == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_identical_gpu(tmp_path):
    model = build("llama").cuda()
    heads = MedusaHeads(model.config.hidden_size, 3)
    save_heads(heads, tmp_path / "h")
    p = torch.randint(3, VOCAB, (1, 8), device="cuda")
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    ref = model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw)
    hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h'}')")
    assert torch.equal(model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw), ref)
