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
from test_speculative import Collect, smaller_perturbed_copy
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


def prompts(batch: int, seed: int = 0, lengths=None, new: int = 32):
    """Left-padded prompts of 70..100 tokens (longer than every budget above), or of `lengths`; pad id 0."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = [100] if batch == 1 else [int(x) for x in torch.randint(70, 101, (batch,), generator=g)]
    t = max(lengths)
    ids = torch.zeros(batch, t, dtype=torch.long)
    mask = torch.zeros(batch, t, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = torch.randint(3, 4000, (n,), generator=g)
        mask[b, t - n:] = 1
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)


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
    assert "add 'fast'" in stats["fallback"]


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
    assert "add 'fast'" not in stats["fallback"]  # it is applied (the warning once said to add it)


@pytest.mark.parametrize("method", ["draft", "lookup"])
def test_with_int4_weights_and_a_kv_plugin(tiny, draft_dir, method):
    """The issue's composition: int4 weights + a KV plugin + speculation, on the runtime, equals int4 + the plugin."""
    base = f"fast+int4(group_size=32)+{KV['sink']}"
    kw = prompts(3, seed=4)
    alone = run(tiny, base, kw)[0]
    assert not torch.equal(alone, run(tiny, "fast+int4(group_size=32)", kw)[0])
    out, stats, caught = run(tiny, f"{base}+{method_spec(method, draft_dir)}", kw)
    assert torch.equal(out, alone) and stats["runtime"] and not caught


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kv, length", [("sink", 52), ("snapkv", 64)])
def test_prompt_of_exactly_budget_plus_slack(tiny, draft_dir, kv, length, batch):
    """A padded prompt of budget + slack tokens (sink 4 + 16, snapkv 32; slack 32) is kept whole by the plugin
    alone. The target's session once also held the batch's extra pad column (which only the drafter re-feeds): one
    token more, so the plugin compressed the prompt and the output was no longer the plugin's."""
    kw = prompts(batch, seed=length, lengths=[length, length - 5][:batch], new=24)
    alone = run(tiny, f"fast+{KV[kv]}", kw)[0]
    out, stats, caught = run(tiny, f"fast+{KV[kv]}+{method_spec('draft', draft_dir)}", kw)
    assert torch.equal(out, alone) and stats["runtime"] and not caught


@pytest.mark.parametrize("kv, length, seed, method", [
    ("kvquant(bits=2, group=16, residual=0)", 61, 1, "lookup(k=6)"),  # verifies cross the flushes at slots 93, 125, 157
    ("kvquant(bits=2, group=16, residual=16)", 5, 5, "lookup(k=3)"),  # a prompt shorter than the residual
])
def test_kvquant_verify_across_a_flush_boundary(tiny, kv, length, seed, method):
    """kvquant quantizes 32 more tokens whenever a step passes T0 + 32 m; one forward of several tokens reads the
    boundary of its first slot for all of them. A verify that crossed one read a flush's tokens in full precision
    where the plugin alone reads them quantized (it is now split at the boundary, `forward_cuts`); and T0, q0 and
    the channel scale once counted the batch's extra pad column."""
    kw = prompts(1, seed=seed, lengths=[length], new=100 if length > 10 else 90)
    alone = run(tiny, f"fast+{kv}", kw)[0]
    out, stats, caught = run(tiny, f"fast+{kv}+{method}", kw)
    assert torch.equal(out, alone) and stats["runtime"] and not caught


@pytest.mark.parametrize("kv", ["h2o", "adakv"])
def test_a_streamed_call_the_runtime_cannot_verify_runs_without_speculation(tiny, kv):
    """h2o and adakv decode one token per step: at batch 1 the session opens, and the first verify (several tokens)
    raises Unsupported before any token was streamed. With a streamer the call once re-raised it to the caller
    ("tokens may have been streamed already"); it now runs without speculation, and every token is streamed once."""
    kw = prompts(1, seed=5, lengths=[80], new=16)
    alone = run(tiny, f"fast+{KV[kv]}", kw)[0]
    streamer = Collect()
    out, stats, caught = run(tiny, f"fast+{KV[kv]}+{method_spec('lookup', None)}", dict(kw, streamer=streamer))
    assert torch.equal(out, alone) and "one token per step" in stats["fallback"] and caught
    assert streamer.ended and torch.equal(torch.cat(streamer.puts), out[0])
