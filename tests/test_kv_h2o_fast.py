"""`h2o+fast`: heavy hitters + recent window evicting inside the fast runtime's decode step
(plugins/kv_cache/_fast_evict.py, `H2OStaticLayer`).

The fast layer must keep, step by step, what `h2o` alone keeps in transformers' loop (`KVLayer`): the same tokens per
row and KV head, with the same accumulated scores, so the same logits and greedy tokens, for batch 1 and left-padded
batches, in a layer of budget + slack + 1 slots (aligned) however many tokens are generated. Sensitivity: eviction
changes these tokens against the unevicted model (checked), and the bookkeeping test compares kept positions and
scores directly, so a layer that evicts the wrong slot, or forgets to accumulate, fails it.
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
from hf_accel.plugins.kv_cache._fast_evict import ALIGN, EMPTY, H2OStaticLayer
from hf_accel.runtime import Unsupported, bucket_capacity, get_runtime

H2O = "h2o(budget=24, recent=8, slack=0)"  # evicts one token per step
H2O_SLACK = "h2o(budget=24, slack=5, prefill_window=8)"  # six tokens every sixth step, default recent (12)
H2O_NO_RECENT = "h2o(budget=30, recent=0, slack=2)"  # the new token itself may be evicted
SPECS = [H2O, H2O_SLACK, H2O_NO_RECENT]
# batch 1 and left-padded batches (3 rows: a batch bucket of 4, one filler row), prompts shorter and longer than the
# budget (+ slack), generation well past the budget
CALLS = [([60], 40), ([70, 30, 55], 40), ([20], 30), ([100, 5], 60), ([9, 120, 33], 25)]


def h2o_layers(model):
    return runtime_layers(model, H2OStaticLayer)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", SPECS)
def test_greedy_equals_h2o_alone(arch, spec):
    assert_fast_equals_alone(arch, spec, CALLS, H2OStaticLayer)


def _kept(positions: torch.Tensor, scores: torch.Tensor):
    """Per row and KV head: the kept positions (padding -1 included) sorted, and their scores in that order."""
    order = positions.argsort(dim=-1, stable=True)
    return positions.gather(-1, order), scores.gather(-1, order)


@pytest.mark.parametrize("spec", [H2O, H2O_SLACK])
def test_kept_tokens_and_scores_follow_kvlayer(spec):
    """Through the runtime's forward API (batch 2, left-padded): after every decode step, every layer, row and KV
    head keeps the same positions as `KVLayer` with the same accumulated scores, and the logits agree."""
    alone, fast = models("llama", spec)
    ids, mask = padded_batch([90, 41], 3)
    session, first = get_runtime(fast).start(ids, mask, max_new_tokens=45)
    cache = KVCache(alone.config.num_hidden_layers, alone._hf_accel_kv_policy, None)
    cache.set_attention_mask(mask)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    evictions = 0
    with torch.no_grad():
        out = alone(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        assert (first - out.logits[:, -1]).abs().max() < 1e-5
        tok = first.argmax(-1, keepdim=True)
        for step in range(44):
            got = session.forward(tok)[:, -1]
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = pos[:, -1:] + 1
            want = alone(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
            assert (got - want).abs().max() < 1e-4, step
            for fl, el in zip(session.cache.layers, cache.layers):
                live = fl.pos[:2] != EMPTY
                assert int(live.sum(-1).min()) == int(live.sum(-1).max()) == el.pos.shape[-1], step
                n = el.pos.shape[-1]
                fpos = fl.pos[:2].masked_fill(~live, 2**30).long()
                got_pos, got_acc = _kept(fpos, fl.acc[:2])
                want_pos, want_acc = _kept(el.pos.long(), el.acc)
                assert torch.equal(got_pos[..., :n], want_pos), (step, fl.layer_idx)
                assert torch.allclose(got_acc[..., :n], want_acc, atol=1e-5), (step, fl.layer_idx)
            evictions += cache.layers[0].pos.shape[-1] < 90 + step + 1
            tok = want.argmax(-1, keepdim=True)
    assert evictions == 44  # every step ran with an evicted cache


def test_capacity_is_bounded_by_the_budget():
    """A 200-token prompt and 150 new tokens (sequence capacity 384): each layer holds budget + slack + 1 slots,
    aligned, whatever the number of new tokens; the factory's bytes include the per-slot positions and scores."""
    model = build("llama").to(torch.bfloat16)
    hf_accel.apply(model, "h2o(budget=40, slack=4)+fast")
    ids, mask = padded_batch([200, 120], 0)
    assert greedy(model, ids, mask, 150).shape == (2, 350)
    rt = get_runtime(model)
    assert rt.stats["calls"] == 1 and rt.stats["fallbacks"] == 0 and rt.pool.k == []
    assert list(rt.sessions) == [(2, bucket_capacity(350), ALIGN)]
    layers = h2o_layers(model)
    per_layer = 2 * rt.kv_heads * ALIGN * (2 * rt.head_dim * 2 + 4 + 4)  # K, V bf16; pos int32; acc float32
    assert all(layer.capacity == ALIGN and layer.nbytes() == per_layer for layer in layers)
    assert model._hf_accel_kv_layer.nbytes() == per_layer * len(layers)
    # short generations stay below the budget: kept + new slots, as snapkv's
    greedy(model, *padded_batch([30], 1), 10)
    assert (1, bucket_capacity(40), ALIGN) in rt.sessions


def test_what_it_cannot_serve_falls_back():
    """Attention other than SDPA is refused (the layer's scores come from `fast_sdpa` handing it the query); the
    speculative API refuses per-row slots and multi-token forwards. (One-token prompts are served:
    test_kv_evict_fast.py::test_one_token_prompts.)"""
    _, fast = models("llama", H2O)
    impl = fast.config._attn_implementation
    fast.config._attn_implementation_internal = "hf_accel_kv:eager"
    with pytest.raises(Unsupported, match="attn_implementation='sdpa'"):
        fast._hf_accel_kv_layer(0, 1, 64, 2, 16, torch.float32, "cpu")
    fast.config._attn_implementation_internal = impl
    rt = get_runtime(fast)
    with pytest.raises(Unsupported, match="per_row_slots"):
        rt.start(*padded_batch([30, 20], 0), max_new_tokens=8, per_row=True)
    session, _ = rt.start(*padded_batch([30], 0), max_new_tokens=8)
    with pytest.raises(Unsupported, match="one token per step"):
        session.forward(torch.tensor([[5, 6]]))


def test_decode_traces_without_graph_breaks():
    """Capturable: the decode write, the attention with its score update and eviction, and the mask have no host
    syncs, data-dependent shapes or Python branches on values (fullgraph=True raises on a graph break), and the
    compiled step leaves the same state as the eager one."""
    torch._dynamo.reset()
    _, fast = models("llama", H2O_SLACK)
    ids, mask = padded_batch([70, 30], 0)
    greedy(fast, ids, mask, 4)
    layer = h2o_layers(fast)[0]
    layer.prefill_rows = None
    h, d = layer.keys.shape[1], layer.keys.shape[3]
    hq = h * 2

    def step(q, k, v, slots):
        layer.slots = slots
        keys, _ = layer.update(k, v)
        return keys.attend(q, None, d ** -0.5), layer.visible(slots)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    state = [t.clone() for t in (layer.keys, layer.values, layer.pos, layer.acc)]
    for s in range(70, 85):  # crosses two evictions (every slack + 1 = 6 steps once full)
        q, k, v = torch.randn(2, hq, 1, d), torch.randn(2, h, 1, d), torch.randn(2, h, 1, d)
        live = [layer.keys, layer.values, layer.pos, layer.acc]
        for t, saved in zip(live, state):
            t.copy_(saved)
        eager = step(q, k, v, torch.tensor([s]))
        after = [t.clone() for t in live]
        for t, saved in zip(live, state):
            t.copy_(saved)
        got = compiled(q, k, v, torch.tensor([s]))
        assert torch.allclose(got[0], eager[0], atol=1e-6) and torch.equal(got[1], eager[1])
        assert all(torch.equal(a, b) for a, b in zip(live, after)), s
        state = after


def test_trained_tiny_reference():
    """The trained `tiny` reference on held-out text: h2o+fast equals h2o alone at batch 1 and a left-padded batch
    of 3, and h2o changes tokens against the full cache there."""
    assert assert_tiny_reference_equal(("h2o(budget=32, recent=8, slack=0)", "h2o(budget=24, slack=3)"), 40) > 0


@pytest.mark.slow
def test_compiled_decode_step_matches_and_compiles_twice():
    """inductor's CPU backend: with capacity (and batch) symbolic, calls in several buckets cost two compiles (batch
    1, batch >= 2), and the tokens stay h2o's."""
    assert_compiles_twice(H2O_SLACK, [([60], 8), ([300], 40), ([70, 30, 55], 30), ([200] * 5, 4), ([40], 70)])
