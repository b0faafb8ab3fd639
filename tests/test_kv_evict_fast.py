"""`snapkv+fast` and `sink+fast`: prompt eviction inside the fast runtime (plugins/kv_cache/_fast_evict.py).

The fast path must give what the policy alone gives in transformers' loop (`KVLayer`): the same kept tokens, so the
same logits and the same greedy tokens, for batch 1 and left-padded batches, in layers sized by the budget
(kept + new tokens), with rows' storage slots decoupled from their sequence slots and positions. Sensitivity: the
calls below change tokens against the unevicted model (checked), so equality is not the full cache's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import build
from test_kv_fast import greedy, models  # (the policy alone, the same weights with `spec+fast`)
from test_runtime import padded_batch

import hf_accel
from hf_accel.plugins.kv_cache import KVCache
from hf_accel.plugins.kv_cache._fast_evict import (ALIGN, AdaKVStaticLayer, EvictLayerFactory, EvictStaticLayer,
                                                   H2OStaticLayer)
from hf_accel.runtime import get_runtime

SNAP = "snapkv(budget=24, window=4, slack=0)"
SNAP_SLACK = "snapkv(budget=40, window=8, kernel=3, slack=8)"
SINK = "sink(window=16, sinks=2, slack=5)"
SINK_NO_SLACK = "sink(window=20, sinks=4, slack=0)"
SPECS = [SNAP, SNAP_SLACK, SINK, SINK_NO_SLACK]
# batch 1 and left-padded batches (3 rows: a batch bucket of 4, one filler row), prompts shorter and longer than the
# budget (+ slack), one longer than 64 new tokens
CALLS = [([60], 40), ([70, 30, 55], 40), ([20], 30), ([100, 5], 60), ([9, 120, 33], 25), ([45], 80)]


def runtime_layers(model, layer_type=EvictStaticLayer):
    """The fast runtime's cache layers of every session, each checked to be a `layer_type`."""
    layers = [layer for s in get_runtime(model).sessions.values() for layer in s.cache.layers]
    assert layers and all(isinstance(layer, layer_type) for layer in layers)
    return layers


def evict_layers(model):
    return runtime_layers(model)


def assert_fast_equals_alone(arch, spec, calls, layer_type=EvictStaticLayer):
    """Greedy tokens of `spec+fast` equal `spec` alone on every call (batch 1 and left-padded), with no fallback
    and no full-size pool, and eviction really changes tokens against the unevicted model."""
    alone, fast = models(arch, spec)
    plain = build(arch)
    changed = 0
    for seed, (lengths, new) in enumerate(calls):
        ids, mask = padded_batch(lengths, seed)
        expected = greedy(alone, ids, mask, new)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            got = greedy(fast, ids, mask, new)
        assert torch.equal(got, expected), (spec, lengths)
        changed += int((greedy(plain, ids, mask, new) != expected).sum())
    rt = get_runtime(fast)
    assert rt.stats["calls"] == len(calls) and rt.stats["fallbacks"] == 0
    assert rt.pool.k == [] and rt.pool.v == []  # no full-size pool next to the small layers
    runtime_layers(fast, layer_type)
    assert changed > 20, changed  # eviction changes these tokens: the equality is the policy's, not the full cache's


def tiny_reference_batch():
    """The trained `tiny` reference and a left-padded batch of 3 held-out-style code prompts (skips if not built)."""
    from hf_accel.quality.reference import load_reference

    try:
        base, tok = load_reference("tiny")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"tiny reference model not built: {e}")
    text = ("def parse(line):\n    key, value = line.split('=', 1)\n    return key.strip(), value.strip()\n\n"
            "class Config:\n    def __init__(self, path):\n        self.path = path\n        self.items = {}\n"
            "        with open(path) as f:\n            for line in f:\n                if '=' in line:\n")
    full = tok(text, return_tensors="pt").input_ids[0]
    rows = [full[:n] for n in (len(full), len(full) - 30, len(full) - 55)]
    t = len(full)
    ids = torch.full((3, t), tok.pad_token_id or 0)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    return base, ids, mask


def assert_tiny_reference_equal(specs, new_tokens) -> int:
    """On the trained `tiny` reference, `spec+fast` equals `spec` alone at batch 1 and 3 for every spec; returns how
    many tokens the policies changed against the full cache."""
    base, ids, mask = tiny_reference_batch()
    changed = 0
    for spec in specs:
        alone, fast = copy.deepcopy(base), copy.deepcopy(base)
        hf_accel.apply(alone, spec)
        hf_accel.apply(fast, spec + "+fast")
        for b in (1, 3):
            expected = greedy(alone, ids[:b], mask[:b], new_tokens)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = greedy(fast, ids[:b], mask[:b], new_tokens)
            assert torch.equal(got, expected), (spec, b)
            changed += int((greedy(base, ids[:b], mask[:b], new_tokens) != expected).sum())
        assert get_runtime(fast).stats["calls"] == 2
    return changed


def assert_compiles_twice(spec, calls):
    """inductor on the CPU: over calls in several buckets the decode step compiles twice (batch 1, batch >= 2) and
    the tokens stay the policy's."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    alone, fast = models("llama", spec)
    rt = get_runtime(fast)
    rt._follow_model()
    rt.use_compile = True
    for seed, (lengths, new) in enumerate(calls):
        ids, mask = padded_batch(lengths, seed)
        assert torch.equal(greedy(fast, ids, mask, new), greedy(alone, ids, mask, new)), (spec, lengths)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 2, spec
    assert rt.stats["calls"] == len(calls) and rt.stats["fallbacks"] == 0 and not rt.warned


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", SPECS)
def test_greedy_equals_the_policy_alone(arch, spec):
    assert_fast_equals_alone(arch, spec, CALLS)


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "mistral"])
@pytest.mark.parametrize("spec", [SNAP, SINK])
def test_other_architectures(arch, spec):
    alone, fast = models(arch, spec)
    for seed, (lengths, new) in enumerate(CALLS[:2]):
        ids, mask = padded_batch(lengths, seed)
        assert torch.equal(greedy(fast, ids, mask, new), greedy(alone, ids, mask, new)), lengths
    assert get_runtime(fast).stats["calls"] == 2 and get_runtime(fast).stats["fallbacks"] == 0


# one-token prompts: batch 1, and 3 rows (a bucket of 4 with a filler row); the 60-token call evicts for every policy
ONE_TOKEN_CALLS = [([1], 50), ([1, 1, 1], 40), ([60], 40)]


@pytest.mark.parametrize("spec,layer_type", [(SNAP, EvictStaticLayer), (SINK, EvictStaticLayer),
                                             ("h2o(budget=24, recent=8, slack=0)", H2OStaticLayer),
                                             ("adakv(budget=24, window=4)", AdaKVStaticLayer)])
def test_one_token_prompts(spec, layer_type):
    """One-token prompts run on the fast path with the policy's tokens. They were refused: the attention hook's
    variant of `fast_sdpa` carried sdpa's mask function, so transformers built the prompt's mask over the layer's
    capacity (a compileable cache gets no is_causal skip at one query), wider than the one key; and the hook handed
    h2o the prompt's query only for prompts of 2 tokens or more."""
    assert_fast_equals_alone("llama", spec, ONE_TOKEN_CALLS, layer_type)


@pytest.mark.parametrize("spec", [SNAP, SINK, "h2o(budget=24, recent=8, slack=0)", "adakv(budget=24, window=4)"])
def test_eager_attention(spec):
    """On a model loaded with attn_implementation='eager', `spec+fast` gives `spec` alone's tokens, one-token prompts
    too: snapkv and sink on the fast path (eager's own attention; the runtime's bool masks reach snapkv's hook over
    eager as additive masks), h2o and adakv, which attend through `fast_sdpa`, in transformers' loop."""
    base = build("llama")
    base.set_attn_implementation("eager")
    alone, fast = copy.deepcopy(base), copy.deepcopy(base)
    hf_accel.apply(alone, spec)
    hf_accel.apply(fast, spec + "+fast")
    served = spec in (SNAP, SINK)
    calls = CALLS[:2] + [([1], 30)]
    for seed, (lengths, new) in enumerate(calls):
        ids, mask = padded_batch(lengths, seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = greedy(fast, ids, mask, new)
        assert torch.equal(got, greedy(alone, ids, mask, new)), lengths
        assert not served or not caught, [str(w.message) for w in caught]
    rt = get_runtime(fast)
    assert (rt.stats["calls"], rt.stats["fallbacks"]) == ((len(calls), 0) if served else (0, len(calls)))


def test_logits_follow_the_policy():
    """Through the runtime's forward API (batch 2, left-padded): each step's logits equal transformers' forward over
    snapkv's own cache to float32 rounding, and are far from the full cache's."""
    alone, fast = models("llama", SNAP)
    ids, mask = padded_batch([90, 41], 3)
    session, first = get_runtime(fast).start(ids, mask, max_new_tokens=30)
    cache = KVCache(alone.config.num_hidden_layers, alone._hf_accel_kv_policy, None)
    cache.set_attention_mask(mask)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = alone(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        plain = alone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        plain_cache = plain.past_key_values
        assert (first - out.logits[:, -1]).abs().max() < 1e-5
        tok = first.argmax(-1, keepdim=True)
        worst, gap = 0.0, 0.0
        for _ in range(29):
            got = session.forward(tok)[:, -1]
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = pos[:, -1:] + 1
            want = alone(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
            unq = alone(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=plain_cache).logits[:, -1]
            worst, gap = max(worst, float((got - want).abs().max())), max(gap, float((got - unq).abs().max()))
            tok = want.argmax(-1, keepdim=True)
    assert cache.stored_tokens()[0] == 24 + 29
    assert worst < 1e-5 and gap > 100 * worst, (worst, gap)


def test_per_row_forward_and_rewind():
    """The speculative API on a per-row session: rows rewind by different counts (storage slots follow the rows'
    sequence slots), and re-running the rejected tokens gives the same logits as the first time."""
    _, fast = models("llama", SNAP)
    ids, mask = padded_batch([50, 33], 1)
    session, _ = get_runtime(fast).start(ids, mask, max_new_tokens=40, per_row=True)
    block = session.forward(torch.tensor([[5, 9, 17], [6, 7, 8]])).clone()
    session.rewind(torch.tensor([2, 1]))  # row 0 keeps 1 token, row 1 keeps 2
    again = session.forward(torch.tensor([[9, 17], [8, 4]])).clone()
    assert torch.allclose(again[0], block[0, 1:], atol=1e-5) and torch.allclose(again[1, 0], block[1, 2], atol=1e-5)
    session.rewind(torch.tensor([3, 4]))  # back to the prompt in both rows
    step = session.forward(torch.tensor([[5], [6]]))[:, -1]
    assert torch.allclose(step, block[:, 0], atol=1e-5)


# --- memory ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["snapkv(budget={b}, window=8, slack=0)", "sink(window={w}, sinks=4, slack=0)"])
def test_memory_scales_with_the_budget(policy):
    """A 900-token prompt, 20 new tokens (sequence capacity 1024): each layer holds kept + new slots (aligned), so
    the factory's bytes follow the budget; the runtime's own full-size pool is never allocated."""
    held = {}
    for b in (64, 128, 256):
        model = build("llama").to(torch.bfloat16)
        hf_accel.apply(model, policy.format(b=b, w=b - 4) + "+fast")
        ids, mask = padded_batch([900, 700], 0)
        assert greedy(model, ids, mask, 20).shape == (2, 920)
        rt = get_runtime(model)
        assert rt.stats["calls"] == 1 and rt.stats["fallbacks"] == 0 and rt.pool.k == []
        layers = evict_layers(model)
        slots = ALIGN * -(-(b + 20) // ALIGN)
        assert list(rt.sessions) == [(2, 1024, slots)]
        per_layer = 2 * 2 * rt.kv_heads * slots * rt.head_dim * 2  # K and V, bf16
        assert all(layer.capacity == slots and layer.nbytes() == per_layer for layer in layers)
        held[b] = model._hf_accel_kv_layer.nbytes()
        assert held[b] == per_layer * len(layers)
    full = 2 * 2 * rt.kv_heads * 1024 * rt.head_dim * 2 * len(layers)  # the full cache's bf16 bytes
    assert held[64] / full < 0.13 and held[128] / full < 0.19 and held[256] / full < 0.32
    assert held[64] < held[128] < held[256]


# --- what stays in transformers' loop, multi-turn, remove -----------------------------------------------------------

def test_unserved_combinations_fall_back():
    """snapkv+kvquant has no fast layers: its calls run transformers' loop with the existing warning and give what
    the plugins alone give (h2o and adakv have layers: test_kv_h2o_fast.py, test_kv_adakv_fast.py)."""
    for spec in ("snapkv(budget=48, window=4, slack=0)+kvquant(bits=8, group=16, residual=4)",):
        alone, fast = models("llama", spec)
        ids, mask = padded_batch([40, 17], 2)
        expected = greedy(alone, ids, mask, 20)
        with pytest.warns(UserWarning, match="is not handled by the fast runtime"):
            got = greedy(fast, ids, mask, 20)
        assert torch.equal(got, expected), spec
        assert get_runtime(fast).stats["calls"] == 0


def test_multi_turn_falls_back_and_plain_calls_are_served():
    """A call that needs the cache back (return_dict_in_generate) runs transformers' loop with snapkv's cache; the
    next turn with that cache continues in transformers' loop (the runtime cannot restore a filled cache); a
    second plain call with the whole conversation is prefilled again and served."""
    alone, fast = models("llama", SNAP)
    ids, mask = padded_batch([60], 5)
    outs = []
    for model in (alone, fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = greedy(model, ids, mask, 20, return_dict_in_generate=True)
            turn = torch.cat([first.sequences, padded_batch([8], 6)[0]], 1)
            second = greedy(model, turn, torch.ones_like(turn), 10, return_dict_in_generate=True,
                            past_key_values=first.past_key_values)
        assert isinstance(second.past_key_values, KVCache)
        outs.append((first.sequences, second.sequences))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    rt = get_runtime(fast)
    assert rt.stats["calls"] == 0
    turn = torch.cat([outs[0][0], padded_batch([8], 6)[0]], 1)
    assert torch.equal(greedy(fast, turn, torch.ones_like(turn), 12), greedy(alone, turn, torch.ones_like(turn), 12))
    assert rt.stats["calls"] == 1


def test_weights_compose_and_remove_restores():
    for spec in ("int8+" + SNAP, "int4(group_size=32)+" + SINK):
        alone, fast = models("llama", spec)
        for seed, (lengths, new) in enumerate(CALLS[:2]):
            ids, mask = padded_batch(lengths, seed)
            assert torch.equal(greedy(fast, ids, mask, new), greedy(alone, ids, mask, new)), (spec, lengths)
        assert get_runtime(fast).stats["calls"] == 2
    model = build("llama")
    impl = model.config._attn_implementation
    hf_accel.apply(model, SNAP + "+fast")
    assert isinstance(model._hf_accel_kv_layer, EvictLayerFactory) and model.config._attn_implementation != impl
    greedy(model, *padded_batch([50], 0), 5)
    hf_accel.remove(model)
    assert not hasattr(model, "_hf_accel_kv_layer") and get_runtime(model) is None
    assert model.config._attn_implementation == impl and "generate" not in vars(model)
    ids, mask = padded_batch([50], 0)
    assert torch.equal(greedy(model, ids, mask, 12), greedy(build("llama"), ids, mask, 12))


def test_deep_copy_gets_its_own_factory():
    model = build("llama")
    hf_accel.apply(model, SINK + "+fast")
    greedy(model, *padded_batch([60], 0), 4)
    twin = copy.deepcopy(model)
    assert twin._hf_accel_kv_layer is not model._hf_accel_kv_layer and twin._hf_accel_kv_layer.model() is twin
    assert twin._hf_accel_kv_layer.nbytes() == 0 < model._hf_accel_kv_layer.nbytes()


# --- capture and compile --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SNAP, SINK])
def test_decode_update_and_mask_trace_without_graph_breaks(spec):
    """Capturable: the decode `update` and `visible` have no host syncs, no data-dependent shapes and no Python
    branch on values (fullgraph=True raises on a graph break)."""
    torch._dynamo.reset()
    _, fast = models("llama", spec)
    ids, mask = padded_batch([70, 30], 0)
    greedy(fast, ids, mask, 4)
    layer = evict_layers(fast)[0]
    layer.prefill_rows = None

    def step(k, v, slots):
        layer.slots = slots
        keys, values = layer.update(k, v)
        return keys.clone(), values.clone(), layer.visible(slots)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    h, d = layer.keys.shape[1], layer.keys.shape[3]
    for s in (70, 71, 90):
        k, v = torch.randn(2, h, 1, d), torch.randn(2, h, 1, d)
        eager = step(k, v, torch.tensor([s]))
        got = compiled(k, v, torch.tensor([s]))
        assert all(torch.equal(a, b) for a, b in zip(got, eager))


def test_trained_tiny_reference():
    """The trained `tiny` reference on held-out text: snapkv+fast and sink+fast equal the policies alone at batch 1
    and a left-padded batch of 3."""
    assert_tiny_reference_equal(("snapkv(budget=32, window=8, slack=0)", "sink(window=24, sinks=4, slack=4)"), 24)


@pytest.mark.slow
def test_compiled_decode_step_matches_and_compiles_twice():
    """The layers mark their storage capacity (and batch) symbolic, so calls in several buckets cost two compiles."""
    for spec in (SNAP, SINK):
        assert_compiles_twice(spec, [([60], 8), ([300], 6), ([70, 30, 55], 8), ([200] * 5, 4), ([40], 70)])
