"""adakv: head-wise adaptive budgets stored per head (memory really freed), exact attention over what is kept."""

from __future__ import annotations

import pytest
import torch
from conftest import build, sample_ids

import hf_accel
from hf_accel.errors import OptionError
from hf_accel.plugins.kv_cache import KVCache
from hf_accel.plugins.kv_cache.adakv import allocate


def greedy(model, ids, mask=None, new=8, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kw)


def left_padded(lengths, total=40, seed=1):
    ids = sample_ids(len(lengths), total, seed)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : total - n] = 0
        mask[i, : total - n] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_budget_above_prompt_equals_full_cache(arch):
    model = build(arch)
    ids = sample_ids(2, 40)
    ref = greedy(model, ids)
    hf_accel.apply(model, "adakv(budget=64, window=8)")
    out = greedy(model, ids)
    assert isinstance(out.past_key_values, KVCache)
    assert all(layer.compressions == 0 for layer in out.past_key_values.layers)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4


def test_memory_is_the_allocated_budget_and_heads_differ():
    model = build("llama")  # 2 layers, 2 KV heads, head_dim 16, float32
    hf_accel.apply(model, "adakv(budget=12, window=4, floor=0.2)")
    prompt, new = 60, 5
    cache = greedy(model, sample_ids(1, prompt, seed=3), new=new).past_key_values
    differ = False
    for layer in cache.layers:
        assert layer.compressions == 1
        lengths = layer.head_lengths()[0].tolist()  # prompt kept + the new-4 decode tokens appended to each head
        assert sum(lengths) == 2 * 12 + 2 * (new - 1)
        assert min(lengths) >= 3 + new - 1  # floor: ceil(0.2 * 12) prompt tokens per head
        differ |= len(set(lengths)) > 1
        # bytes held: exactly the kept slots (K and V, float32, head_dim 16), nothing masked
        assert layer.kv_nbytes() == sum(lengths) * 2 * 16 * 4
        for p in layer.hpos:
            assert bool((p >= 0).all()) and bool((p[:, 1:] > p[:, :-1]).all())  # ordered, no empty slot at batch 1
            assert p[0, -(new - 1) - 4:].tolist() == list(range(prompt - 4, prompt + new - 1))  # window + decode
    assert differ, "per-head lengths should differ on a real (random-weight) model"
    hf_accel.remove(model)
    hf_accel.apply(model, "adakv(budget=200, window=4)")
    full = greedy(model, sample_ids(1, prompt, seed=3), new=new).past_key_values
    assert cache.nbytes() < 0.5 * full.nbytes()


def test_allocate_floor_and_total():
    s0 = torch.tensor([[9.0, 8, 7, 6, 5, 4]])
    s1 = torch.tensor([[0.1, 0.2, 0.3, -float("inf"), 0.0, float("inf")]])
    keep = allocate([s0, s1], budget=3, floor=2)
    assert keep[1][0].tolist() == [False, False, True, False, False, True]  # floor 2: inf + best
    assert keep[0][0].tolist() == [True, True, True, True, False, False]  # the rest of 6 goes to the best scores
    none = allocate([s0, s1], budget=3, floor=0)
    assert int(none[0].sum() + none[1].sum()) == 6 and bool(none[1][0, 5])


@pytest.mark.parametrize("spec", ["adakv(budget=64, window=4)", "adakv(budget=10, window=4)",
                                  "adakv(budget=10, window=4, floor=0.0, pooling='avg', kernel=3)"])
def test_left_padding_matches_single_rows(spec):
    model = build("llama")
    lengths = [40, 31, 19]
    ids, mask = left_padded(lengths)
    hf_accel.apply(model, spec)
    batch = greedy(model, ids, mask)
    for i, n in enumerate(lengths):
        single = greedy(model, ids[i:i + 1, -n:])
        assert torch.equal(batch.sequences[i, -single.sequences.shape[1]:], single.sequences[0])
        diff = max((a[i] - b[0]).abs().max().item() for a, b in zip(batch.logits, single.logits))
        assert diff < 1e-4, (i, diff)
        for lb, ls in zip(batch.past_key_values.layers, single.past_key_values.layers):
            assert lb.head_lengths()[i].tolist() == ls.head_lengths()[0].tolist()  # per row and head


def test_multi_turn_compresses_again():
    model = build("llama")
    hf_accel.apply(model, "adakv(budget=12, window=4)")
    first = greedy(model, sample_ids(1, 40), new=5)
    turn2 = torch.cat([first.sequences, sample_ids(1, 30, seed=5)], dim=1)
    second = greedy(model, turn2, past_key_values=first.past_key_values, new=5)
    cache = second.past_key_values
    assert cache is first.past_key_values and cache.get_seq_length() == turn2.shape[1] + 4
    assert all(torch.isfinite(s).all() for s in second.logits)
    for layer in cache.layers:
        assert layer.compressions == 2 and int(layer.head_lengths().sum()) == 2 * 12 + 2 * 4


def test_bad_options():
    for spec, match in [("adakv(budget=8, window=8)", "window"), ("adakv(floor=1.5)", "floor"),
                        ("adakv(kernel=4)", "kernel"), ("adakv(budget=0)", "budget"),
                        ("adakv(pooling='min')", "pooling")]:
        model = build("llama")
        with pytest.raises(OptionError, match=match):
            hf_accel.apply(model, spec)
        assert hf_accel.get_config(model) is None or not hf_accel.get_config(model).plugins
    with pytest.raises(Exception, match="snapkv|adakv"):
        hf_accel.apply(build("llama"), "adakv+snapkv")


def test_artifact_keeps_the_spec(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("qwen2")
    hf_accel.apply(model, "adakv(budget=12, window=4, floor=0.3)")
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    plugin = hf_accel.get_config(loaded).plugins[0]
    assert (plugin.name, plugin.budget, plugin.window, plugin.floor) == ("adakv", 12, 4, 0.3)
    x = sample_ids(1, 40)
    assert torch.equal(greedy(loaded, x).sequences, greedy(model, x).sequences)


@pytest.mark.gpu
def test_gpu_bf16_generous_equals_full():
    model = build("llama").to("cuda", torch.bfloat16)
    ids = sample_ids(2, 200).cuda()
    ref = greedy(model, ids, new=16)
    hf_accel.apply(model, "adakv(budget=512, window=32)")
    assert torch.equal(greedy(model, ids, new=16).sequences, ref.sequences)
    hf_accel.remove(model)
    hf_accel.apply(model, "adakv(budget=64, window=16)")
    out = greedy(model, ids, new=16)
    assert all(layer.compressions == 1 for layer in out.past_key_values.layers)


def test_composes_with_int4_and_fast():
    ids = sample_ids(1, 40)
    model = build("llama")
    hf_accel.apply(model, "int4")
    ref = greedy(model, ids).sequences
    model = build("llama")
    hf_accel.apply(model, "int4+adakv(budget=64, window=4)")
    assert torch.equal(greedy(model, ids).sequences, ref)
    model = build("llama")
    hf_accel.apply(model, "adakv(budget=12, window=4)")
    alone = greedy(model, ids).sequences
    hf_accel.remove(model)
    hf_accel.apply(model, "fast+adakv(budget=12, window=4)")
    with pytest.warns(UserWarning, match="fast"):
        both = greedy(model, ids)
    assert isinstance(both.past_key_values, KVCache) and torch.equal(both.sequences, alone)
