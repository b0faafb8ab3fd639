"""`adakv+fast`: Ada-KV's head-wise budgets inside the fast runtime (plugins/kv_cache/_fast_evict.py,
`AdaKVStaticLayer`: every KV head's kept tokens of a row in one flat pool, each slot tagged with its head).

The fast layer must keep what `adakv` alone keeps (`AdaKVLayer`: the same tokens per row and KV head, from the same
votes and allocation), so the same logits and greedy tokens, for batch 1 and left-padded batches, and hold what a
per-head layout holds: budget x heads prompt slots per row, not the widest head's count x heads. Sensitivity: the
calls below change tokens against the unevicted model (checked), and the bookkeeping test compares each head's kept
positions with AdaKVLayer's.
"""

from __future__ import annotations


import pytest
import torch
from conftest import build
from test_kv_evict_fast import (assert_compiles_twice, assert_fast_equals_alone, assert_tiny_reference_equal,
                                runtime_layers)
from test_kv_fast import greedy, models
from test_runtime import padded_batch

import hf_accel
from hf_accel.plugins.kv_cache import KVCache
from hf_accel.plugins.kv_cache._fast_evict import ALIGN, AdaKVStaticLayer
from hf_accel.runtime import Unsupported, get_runtime

ADA = "adakv(budget=24, window=4)"
ADA_AVG = "adakv(budget=16, window=4, floor=0.0, pooling='avg', kernel=3)"  # heads may keep nothing of the prompt
CALLS = [([60], 40), ([70, 30, 55], 40), ([20], 30), ([100, 5], 60), ([9, 120, 33], 25)]


def ada_layers(model):
    return runtime_layers(model, AdaKVStaticLayer)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", [ADA, ADA_AVG])
def test_greedy_equals_adakv_alone(arch, spec):
    assert_fast_equals_alone(arch, spec, CALLS, AdaKVStaticLayer)


def test_kept_tokens_and_logits_follow_adakv():
    """Through the runtime's forward API (batch 2, left-padded): every layer, row and KV head keeps the prompt
    positions AdaKVLayer keeps, and each decode step's logits agree."""
    alone, fast = models("llama", ADA)
    ids, mask = padded_batch([90, 41], 3)
    t = ids.shape[1]
    session, first = get_runtime(fast).start(ids, mask, max_new_tokens=20)
    cache = KVCache(alone.config.num_hidden_layers, alone._hf_accel_kv_policy, None)
    cache.set_attention_mask(mask)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = alone(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        assert (first - out.logits[:, -1]).abs().max() < 1e-5
        for fl, el in zip(session.cache.layers, cache.layers):
            assert el.compressions == 1
            for row in range(2):
                for h, hpos in enumerate(el.hpos):
                    want = sorted(int(p) for p in hpos[row] if p >= 0)
                    mine = (fl.head[row] == h) & (fl.pos[row] >= 0) & (fl.pos[row] < t)
                    assert sorted(int(p) for p in fl.pos[row][mine]) == want, (fl.layer_idx, row, h)
        lengths = torch.stack([el.head_lengths() for el in cache.layers])
        assert int(lengths.max()) > int(lengths.min())  # heads keep different numbers of tokens
        tok = first.argmax(-1, keepdim=True)
        for step in range(19):
            got = session.forward(tok)[:, -1]
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = pos[:, -1:] + 1
            want = alone(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
            assert (got - want).abs().max() < 1e-4, step
            tok = want.argmax(-1, keepdim=True)


def test_memory_is_the_budget_not_the_widest_head():
    """A 900-token prompt, 20 new tokens, budget 64 per head on average: the flat pool holds budget x heads prompt
    slots + heads per new token (H x (budget + new), aligned), the bytes snapkv holds at that budget; a padded
    per-head layout would need the widest head's count x heads, which this allocation makes larger."""
    model = build("llama").to(torch.bfloat16)
    hf_accel.apply(model, "adakv(budget=64, window=8)+fast")
    ids, mask = padded_batch([900, 700], 0)
    assert greedy(model, ids, mask, 20).shape == (2, 920)
    rt = get_runtime(model)
    assert rt.stats["calls"] == 1 and rt.stats["fallbacks"] == 0 and rt.pool.k == []
    slots = ALIGN * -(-(64 + 20) // ALIGN)
    layers = ada_layers(model)
    per_layer = 2 * rt.kv_heads * slots * (2 * rt.head_dim * 2 + 4 + 4)  # K, V bf16; head and position int32
    assert all(layer.capacity == slots and layer.nbytes() == per_layer for layer in layers)
    assert model._hf_accel_kv_layer.nbytes() == per_layer * len(layers)
    assert max(layer.widest_head for layer in layers) > 64  # a padded layout would hold more than the budget


def test_what_it_cannot_serve():
    """The speculative API refuses per-row slots and multi-token forwards. (One-token prompts are served:
    test_kv_evict_fast.py::test_one_token_prompts.)"""
    _, fast = models("llama", ADA)
    rt = get_runtime(fast)
    with pytest.raises(Unsupported, match="per_row_slots"):
        rt.start(*padded_batch([30, 20], 0), max_new_tokens=8, per_row=True)
    session, _ = rt.start(*padded_batch([30], 0), max_new_tokens=8)
    with pytest.raises(Unsupported, match="one token per step"):
        session.forward(torch.tensor([[5, 6]]))


def test_decode_traces_without_graph_breaks():
    torch._dynamo.reset()
    _, fast = models("llama", ADA)
    ids, mask = padded_batch([70, 30], 0)
    greedy(fast, ids, mask, 4)
    layer = ada_layers(fast)[0]
    layer.prefill_rows = None
    h, d = layer.keys.shape[1], layer.keys.shape[3]

    def step(q, k, v, slots):
        layer.slots = slots
        keys, _ = layer.update(k, v)
        return keys.attend(q, None, d ** -0.5), layer.visible(slots), layer.flat_keys.clone()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for s in (70, 71, 90):
        q, k, v = torch.randn(2, 2 * h, 1, d), torch.randn(2, h, 1, d), torch.randn(2, h, 1, d)
        eager = step(q, k, v, torch.tensor([s]))
        got = compiled(q, k, v, torch.tensor([s]))
        assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(got, eager))


def test_trained_tiny_reference():
    """The trained `tiny` reference on held-out text: adakv+fast equals adakv alone at batch 1 and a left-padded
    batch of 3."""
    assert_tiny_reference_equal(("adakv(budget=24, window=8)",), 32)


@pytest.mark.slow
def test_compiled_decode_step_matches_and_compiles_twice():
    """inductor's CPU backend: with the pool's size (and batch) symbolic, calls in several buckets cost two compiles
    (batch 1, batch >= 2), and the tokens stay adakv's."""
    assert_compiles_twice(ADA, [([60], 8), ([300], 40), ([70, 30, 55], 30), ([200] * 5, 4), ([40], 70)])
