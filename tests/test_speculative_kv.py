"""Speculative decoding composed with KV plugins (issue 7: "roll back the KV cache of rejected tokens correctly with
every KV plugin"): the output is what the model with the KV plugin alone produces, token for token.

On the fast runtime the verify forwards run on the plugin's own static layers (sink, snapkv: per-row slots;
kvquant at batch 1), and the first verify takes the prompt's last logits from the prefill (a plugin that
compresses at the prefill would give a re-fed token other logits). Everywhere else (no `fast`, or a plugin the
runtime cannot serve per row) the call runs without speculation, with a warning, never on a full-K/V cache that
silently drops the plugin. The trained `tiny` reference and prompts longer than every budget make each plugin
change the output, so a dropped plugin shows.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_speculative import smaller_perturbed_copy
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.quality.reference import reference_path

pytestmark = pytest.mark.usefixtures("one_thread")

KV = {
    "sink": "sink(window=16, sinks=4)",
    "snapkv": "snapkv(budget=32, window=8, kernel=3)",
    "kvquant": "kvquant(bits=2, group=16, residual=0)",
    "h2o": "h2o(budget=32)",
    "adakv": "adakv(budget=32, window=8, kernel=3)",
    "quest": "quest(budget=32, page=8)",
    "duo": "duo(ratio=0.25, sinks=4, window=16, slack=4)",
}
ON_RUNTIME = ("sink", "snapkv")  # per-row slots: any batch speculates on the runtime


@pytest.fixture(scope="module")
def tiny():
    return AutoModelForCausalLM.from_pretrained(reference_path("tiny"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def draft_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec_kv") / "draft"
    smaller_perturbed_copy(tiny, layers=1, noise=0.2).save_pretrained(path)
    return path


def prompts(batch: int, seed: int = 0):
    """Left-padded prompts of 70..100 tokens (longer than every budget above), pad id 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = [100] if batch == 1 else [int(x) for x in torch.randint(70, 101, (batch,), generator=g)]
    t = max(lengths)
    ids = torch.zeros(batch, t, dtype=torch.long)
    mask = torch.zeros(batch, t, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = torch.randint(3, 4000, (n,), generator=g)
        mask[b, t - n:] = 1
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)


def run(model, spec: str, kw: dict):
    """(ids, stats of the speculative plugin or {}, warning messages) of generate() under `spec`."""
    model = copy.deepcopy(model)
    if spec:
        hf_accel.apply(model, spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**kw)
    return out, dict(getattr(model, "hf_accel_spec_stats", {})), [str(w.message) for w in caught]


def method_spec(method: str, draft_dir) -> str:
    return {"draft": f"draft(draft='{draft_dir}', k=3)", "lookup": "lookup(k=3)"}[method]


@pytest.mark.parametrize("kv", list(KV))
def test_without_fast_the_kv_plugin_is_kept(tiny, draft_dir, kv):
    kw = prompts(2, seed=1)
    alone = run(tiny, KV[kv], kw)[0]
    assert not torch.equal(alone, run(tiny, "", kw)[0])  # the plugin changes the output: dropping it would show
    out, stats, caught = run(tiny, f"{KV[kv]}+{method_spec('draft', draft_dir)}", kw)
    assert torch.equal(out, alone)
    assert "KV plugin" in stats["fallback"] and any("KV plugin" in m for m in caught)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", ["draft", "lookup"])
@pytest.mark.parametrize("kv", ON_RUNTIME)
def test_on_the_runtime_speculates_with_the_kv_plugin(tiny, draft_dir, kv, method, batch):
    kw = prompts(batch, seed=batch)
    alone = run(tiny, f"fast+{KV[kv]}", kw)[0]
    assert not torch.equal(alone, run(tiny, "fast", kw)[0])
    out, stats, caught = run(tiny, f"fast+{KV[kv]}+{method_spec(method, draft_dir)}", kw)
    assert torch.equal(out, alone), f"{kv} {method} batch {batch}"
    assert stats["runtime"] and "fallback" not in stats and not caught
    if method == "draft":
        assert stats["row_rounds"] < stats["generated"]  # drafts were accepted, and rolled back when rejected


def test_kvquant_speculates_on_the_runtime_at_batch_1_and_falls_back_above(tiny, draft_dir):
    spec = f"fast+{KV['kvquant']}"
    kw = prompts(1)
    out, stats, caught = run(tiny, f"{spec}+{method_spec('draft', draft_dir)}", kw)
    assert torch.equal(out, run(tiny, spec, kw)[0]) and stats["runtime"] and not caught
    kw = prompts(3)
    out, stats, caught = run(tiny, f"{spec}+{method_spec('draft', draft_dir)}", kw)
    assert torch.equal(out, run(tiny, spec, kw)[0])
    assert "per_row_slots" in stats["fallback"] and any("per_row_slots" in m for m in caught)


@pytest.mark.parametrize("kv", ["h2o", "adakv", "quest", "duo"])
def test_on_the_runtime_a_policy_it_cannot_serve_per_row_runs_without_speculation(tiny, draft_dir, kv):
    kw = prompts(2, seed=3)
    alone = run(tiny, f"fast+{KV[kv]}", kw)[0]
    out, stats, caught = run(tiny, f"fast+{KV[kv]}+{method_spec('lookup', draft_dir)}", kw)
    assert torch.equal(out, alone) and "fallback" in stats and caught


@pytest.mark.parametrize("method", ["draft", "lookup"])
def test_with_int4_weights_and_a_kv_plugin(tiny, draft_dir, method):
    """The issue's composition: int4 weights + a KV plugin + speculation, on the runtime, equals int4 + the plugin."""
    base = f"fast+int4(group_size=32)+{KV['sink']}"
    kw = prompts(3, seed=4)
    alone = run(tiny, base, kw)[0]
    assert not torch.equal(alone, run(tiny, "fast+int4(group_size=32)", kw)[0])
    out, stats, caught = run(tiny, f"{base}+{method_spec(method, draft_dir)}", kw)
    assert torch.equal(out, alone) and stats["runtime"] and not caught
