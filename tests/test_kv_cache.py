"""KV-cache plugins (sink, h2o, snapkv, kvquant): exactness with generous budgets, bounded memory with small ones,
which tokens are kept, left padding, quantization error, multi-turn, composition, remove() and artifacts; the
score-reading policies (also adakv, quest, duo) under eager attention."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build, sample_ids

import hf_accel
from hf_accel.compat import get_cache
from hf_accel.errors import AccelError, OptionError
from hf_accel.plugins.kv_cache import KVCache
from hf_accel.plugins.kv_cache._layers import dequantize, quantize

GENEROUS = {  # budgets above prompt + new tokens: every policy must equal the full cache exactly
    "sink": "sink(window=200, sinks=4)",
    "h2o": "h2o(budget=200)",
    "snapkv": "snapkv(budget=200, window=8)",
    "kvquant": "kvquant(bits=8, group=16, residual=200)",  # everything stays in the full-precision window
    "h2o+kvquant": "h2o(budget=200)+kvquant(bits=4, group=16, residual=150)",
}
SMALL = {  # (spec, budget); slack=0: evict every step, so the budget is exact
    "sink": ("sink(window=10, sinks=2, slack=0)", 12),
    "h2o": ("h2o(budget=12, recent=4, slack=0)", 12),
    "snapkv": ("snapkv(budget=12, window=4, slack=0)", 12),  # prompt compressed to 12, then decoding appends
    "h2o+kvquant": ("h2o(budget=48, recent=8, slack=0)+kvquant(bits=4, group=16, residual=4)", 48),
    "sink+kvquant": ("sink(window=46, sinks=2, slack=0)+kvquant(bits=8, group=16, residual=4)", 48),
}


def greedy(model, ids, mask=None, new=8, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, **kw)


def left_padded(lengths, total=24, seed=1):
    ids = sample_ids(len(lengths), total, seed)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : total - n] = 0
        mask[i, : total - n] = 0
    return ids, mask


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_generous_budget_equals_full_cache(arch):
    model = build(arch)
    ids = sample_ids(2, 20)
    ref = greedy(model, ids).sequences
    for name, spec in GENEROUS.items():
        hf_accel.apply(model, spec)
        out = greedy(model, ids)
        assert isinstance(out.past_key_values, KVCache), name
        assert torch.equal(out.sequences, ref), name
        hf_accel.remove(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_budget_bounds_memory(arch, name):
    spec, budget = SMALL[name]
    model = build(arch)
    hf_accel.apply(model, spec)
    new, prompt = 16, 80
    out = greedy(model, sample_ids(2, prompt), new=new, output_logits=True)
    assert all(torch.isfinite(s).all() for s in out.logits)
    cache = out.past_key_values
    seen = prompt + new - 1
    assert cache.get_seq_length() == seen
    stored = cache.stored_tokens()
    bound = budget + (new - 1 if name == "snapkv" else 0)  # snapkv compresses the prompt only
    assert all(s == stored[0] for s in stored) and stored[0] <= bound < seen
    full_bytes = 0
    for layer in cache.layers:  # the tensors really are that small, per row and KV head
        k, v = layer.materialize()
        assert k.shape[2] == v.shape[2] == stored[0] and torch.isfinite(k).all() and torch.isfinite(v).all()
        full_bytes += 2 * k[:, :, :1].nbytes * seen
    assert cache.nbytes() < full_bytes * (bound + 8) / seen  # positions/scores are small next to K/V


def test_slack_bounds_memory_between_evictions():
    model = build("llama")
    hf_accel.apply(model, "sink(window=10, sinks=2, slack=5)")
    cache = None
    for new in (1, 3, 6, 9):
        cache = greedy(model, sample_ids(1, 30), new=new).past_key_values
        assert 12 <= cache.stored_tokens()[0] <= 17
    assert cache.stored_tokens()[0] < 17  # it did evict back down


def test_sink_keeps_sinks_and_window():
    model = build("llama")
    hf_accel.apply(model, "sink(window=8, sinks=3, slack=0)")
    out = greedy(model, sample_ids(2, 30), new=10)
    cache = out.past_key_values
    seen = cache.get_seq_length()
    expected = list(range(3)) + list(range(seen - 8, seen))
    for layer in cache.layers:
        assert (layer.pos == torch.tensor(expected, dtype=torch.int32)).all()


def test_h2o_keeps_heavy_hitters_and_recent():
    model = build("llama")
    hf_accel.apply(model, "h2o(budget=12, recent=4, slack=0)")
    cache = greedy(model, sample_ids(1, 30), new=6).past_key_values
    seen = cache.get_seq_length()
    for layer in cache.layers:
        pos, acc = layer.pos[0], layer.acc[0]
        assert acc.sum() > 0  # the attention hook ran and accumulated scores
        for h in range(pos.shape[0]):
            assert set(range(seen - 4, seen)) <= set(pos[h].tolist())  # the recent window
            assert pos[h].tolist() == sorted(pos[h].tolist())
        assert not torch.equal(acc[0], acc[1])  # scored per KV head (selection per head: see the next test)


def test_h2o_selection_is_topk_of_scores():
    """Drive the layer directly: scores fed through the hook decide exactly which slots survive."""
    from hf_accel.plugins.kv_cache import H2OPolicy, KVCache

    policy = H2OPolicy(budget=6, recent=2, slack=0)
    cache = KVCache(1, policy)
    layer = cache.layers[0]
    keys = torch.randn(1, 1, 10, 4)
    layer.update(keys, keys.clone())
    heavy = [1, 4, 6, 7]
    layer.pending = False
    layer.acc[0, 0, heavy] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    layer.acc[0, 0, 9] = 0.0  # recent: kept regardless
    layer.evict(10)
    assert layer.pos[0, 0].tolist() == [1, 4, 6, 7, 8, 9]
    assert torch.equal(layer.keys[0, 0], keys[0, 0, [1, 4, 6, 7, 8, 9]])


def test_snapkv_keeps_window_and_clusters():
    model = build("qwen2")
    hf_accel.apply(model, "snapkv(budget=16, window=4, kernel=3, slack=0)")
    cache = greedy(model, sample_ids(2, 40), new=3).past_key_values
    for layer in cache.layers:
        pos = layer.pos
        assert pos.shape[-1] == 16 + 2  # compressed prompt + the two decode steps appended
        assert (pos[..., 12:16] == torch.arange(36, 40, dtype=torch.int32)).all()  # observation window kept


@pytest.mark.parametrize("name", ["sink", "h2o", "snapkv"])
def test_left_padding_keeps_real_tokens_and_matches_single_rows(name):
    model = build("llama")
    lengths = [24, 15, 9]
    ids, mask = left_padded(lengths)
    hf_accel.apply(model, GENEROUS[name])
    batch = greedy(model, ids, mask).sequences
    for i, n in enumerate(lengths):
        single = greedy(model, ids[i:i + 1, -n:]).sequences
        assert torch.equal(batch[i, -single.shape[1]:], single[0])
    hf_accel.remove(model)
    # small budget: every row's kept slots are real tokens (padding evicted first), pads only where a row is short
    hf_accel.apply(model, SMALL[name][0])
    cache = greedy(model, ids, mask, new=6).past_key_values
    seen = cache.get_seq_length()
    for layer in cache.layers:
        for i, n in enumerate(lengths):
            pos = layer.pos[i]
            real = pos[pos >= 0]
            assert (real >= seen - n - 5).all()  # real positions of row i only
            n_pad = (pos < 0).sum(-1)
            assert (n_pad == max(0, pos.shape[-1] - (n + 5))).all()  # padding only when the row is shorter
            assert (pos[:, : int(n_pad[0])] < 0).all()  # and it sits first, under the mask's zeros
    if name == "sink":  # sinks are each row's first real tokens, not its padding
        layer = cache.layers[0]
        for i, n in enumerate(lengths):
            first = 24 - n
            assert set(range(first, first + 2)) <= set(layer.pos[i, 0].tolist())


def test_padding_hole_is_refused():
    model = build("llama")
    hf_accel.apply(model, "sink(window=8, sinks=2)")
    ids = sample_ids(1, 12)
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    with pytest.raises(AccelError, match="left-padded"):
        greedy(model, ids, mask)


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.12)])
def test_kvquant_error_bounds(bits, bound):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 64, 32)
    x[..., 3] *= 20  # an outlier channel, as keys have
    codes, scale, lo = quantize(x, bits, 16)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 32 * bits // 8
    err = (dequantize(codes, scale, lo, bits, 16) - x).norm() / x.norm()
    assert err < bound
    # through the cache: keys (per-channel scaled) and values, dequantised as attention reads them
    from hf_accel.plugins.kv_cache import KVQuant
    cache = KVCache(1, None, KVQuant(bits=bits, group=16, residual=0))
    k, v = x.clone(), torch.randn(2, 2, 64, 32)
    cache.layers[0].update(k, v)
    kq, vq = cache.layers[0].materialize()
    assert (kq - k).norm() / k.norm() < bound and (vq - v).norm() / v.norm() < bound
    assert cache.layers[0].quant.length == 64 and cache.layers[0].keys.shape[-2] == 0
    fp = k.nbytes + v.nbytes
    assert cache.nbytes() < fp * (bits / 32 + 0.15)  # codes + per-group scales


def test_kvquant_long_prompt_is_quantized_in_chunks(monkeypatch):
    from hf_accel.plugins.kv_cache import _layers
    k, v = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    whole = _layers.QuantStore(4, 16)
    whole.append(k, v)
    monkeypatch.setattr(_layers, "QUANT_CHUNK", 64)
    chunked = _layers.QuantStore(4, 16)
    chunked.append(k, v)
    assert all(torch.equal(whole.tensors[n], chunked.tensors[n]) for n in whole.tensors)


def test_kvquant_residual_window_stays_full_precision():
    from hf_accel.plugins.kv_cache import KVQuant
    cache = KVCache(1, None, KVQuant(bits=4, group=16, residual=8))
    layer = cache.layers[0]
    k = torch.randn(1, 2, 20, 32)
    layer.update(k, k)
    assert layer.quant.length == 12 and torch.equal(layer.keys, k[:, :, 12:])  # the prompt's last 8 stay fp
    for i in range(31):  # decode: full-precision tokens are quantized 32 at a time
        layer.update(k[:, :, :1], k[:, :, :1])
    assert layer.quant.length == 12 and layer.keys.shape[-2] == 39
    layer.update(k[:, :, :1], k[:, :, :1])
    assert layer.quant.length == 44 and layer.keys.shape[-2] == 8


@pytest.mark.parametrize("spec", ["sink(window=200, sinks=4)", "h2o(budget=200)", "snapkv(budget=200, window=8)",
                                  "h2o(budget=30, recent=8, slack=0)", "sink(window=40, sinks=4)+kvquant(bits=8, group=16, residual=2)"])
def test_multi_turn(spec):
    model = build("llama")
    ids = sample_ids(1, 24)
    hf_accel.apply(model, spec)
    first = greedy(model, ids, new=6)
    turn2 = torch.cat([first.sequences, sample_ids(1, 10, seed=5)], dim=1)
    second = greedy(model, turn2, past_key_values=first.past_key_values, new=6)
    assert second.past_key_values is first.past_key_values
    assert second.past_key_values.get_seq_length() == turn2.shape[1] + 5
    hf_accel.remove(model)
    fresh = greedy(model, turn2, new=6).sequences
    if "200" in spec:  # generous: a continued conversation equals a fresh full-cache run on the whole text
        assert torch.equal(second.sequences, fresh)
    else:
        assert second.sequences.shape == fresh.shape


def test_remove_restores_generate_and_attention():
    model = build("llama")
    before_impl = model.config._attn_implementation
    assert "generate" not in model.__dict__
    hf_accel.apply(model, "h2o(budget=32)+kvquant(bits=8, group=16)")
    assert model.config._attn_implementation.startswith("hf_accel_kv:")
    hf_accel.remove(model)
    assert "generate" not in model.__dict__ and model.config._attn_implementation == before_impl
    out = greedy(model, sample_ids(1, 10))
    assert type(out.past_key_values).__name__ == "DynamicCache"


SCORED = ["h2o(budget=12, recent=4, slack=0)", "snapkv(budget=12, window=4, slack=0)", "adakv(budget=8, window=4)",
          "quest(budget=16, page=4)", "duo(heads='10.01', sinks=2, window=6, slack=0)"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eager_attention_equals_sdpa(arch):
    """The policies that read attention through the hook work on a model loaded with attn_implementation='eager'
    ("eager" is no AttentionInterface entry: the hook once raised KeyError 'eager') and keep what they keep under
    sdpa: the same tokens, which eviction changes against the full cache (checked); duo calibrates the same heads."""
    import copy

    from hf_accel.plugins.kv_cache import calibrate_duo

    ids, mask = left_padded([24, 17, 9])
    changed = 0
    for spec in SCORED:
        sdpa = build(arch)
        eager = copy.deepcopy(sdpa)
        eager.set_attn_implementation("eager")
        full = greedy(sdpa, ids, mask, new=16).sequences
        hf_accel.apply(sdpa, spec)
        hf_accel.apply(eager, spec)
        assert eager.config._attn_implementation == "hf_accel_kv:eager"
        expected = greedy(sdpa, ids, mask, new=16).sequences
        assert torch.equal(greedy(eager, ids, mask, new=16).sequences, expected), spec
        changed += int((expected != full).sum() > 0)
    assert changed == len(SCORED)
    sdpa = build(arch)
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert calibrate_duo(eager, ratio=0.5) == calibrate_duo(sdpa, ratio=0.5)


def test_composes_with_int8_and_other_generate_wrappers():
    model = build("llama")
    calls = []
    original = model.generate

    def outer(*a, **k):  # some other plugin's wrapper, installed first
        calls.append(1)
        return original(*a, **k)

    model.generate = outer
    hf_accel.apply(model, "int8+sink(window=40, sinks=2, slack=0)+kvquant(bits=4, group=16, residual=4)")
    out = greedy(model, sample_ids(2, 60))
    assert calls and isinstance(out.past_key_values, KVCache)
    assert out.past_key_values.stored_tokens()[0] == 42 and out.past_key_values.layers[0].quant.length > 0
    assert torch.isfinite(model(out.sequences).logits).all()
    hf_accel.remove(model)
    assert model.generate is outer


def test_pipeline_gets_the_policy_without_past_key_values():
    from conftest import make_tokenizer
    from transformers import pipeline

    model = build("llama")
    hf_accel.apply(model, "sink(window=8, sinks=2)")
    caches = []
    handle = model.register_forward_pre_hook(lambda m, a, k: caches.append(get_cache(k)), with_kwargs=True)
    pipe = pipeline("text-generation", model=model, tokenizer=make_tokenizer())
    pipe("hello world, this is long enough", max_new_tokens=4, do_sample=False)
    handle.remove()
    assert caches and all(isinstance(c, KVCache) for c in caches)
    assert caches[-1].stored_tokens()[0] <= 8 + 2 + 32  # budget + slack


def test_artifact_keeps_kv_spec(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("qwen2")
    hf_accel.apply(model, "h2o(budget=64, recent=16)+kvquant(bits=8, group=16, residual=8)")
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert hf_accel.get_config(loaded).to_string() == hf_accel.get_config(model).to_string()
    ids = sample_ids(1, 20)
    assert torch.equal(greedy(loaded, ids).sequences, greedy(model, ids).sequences)
    assert isinstance(greedy(loaded, ids).past_key_values, KVCache)


def test_bad_options_and_models():
    with pytest.raises(OptionError):
        hf_accel.apply(build("llama"), "snapkv(budget=8, window=8)")
    with pytest.raises(OptionError):
        hf_accel.apply(build("llama"), "kvquant(group=12)")  # does not divide head_dim 16
    with pytest.raises(AccelError, match="cannot be combined"):
        hf_accel.apply(build("llama"), "sink+h2o")
    model = build("llama")
    hf_accel.apply(model, "h2o(budget=40)+kvquant(residual=16, group=16)")
    with pytest.raises(AccelError, match="residual"):
        greedy(model, sample_ids(1, 12))


def test_sliding_window_model_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    from hf_accel.errors import UnsupportedModelError
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, sliding_window=16))
    with pytest.raises(UnsupportedModelError, match="sliding"):
        hf_accel.apply(model, "sink")
