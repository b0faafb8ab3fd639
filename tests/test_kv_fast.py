"""`kvquant+fast`: kvquant's quantized KV inside the fast runtime (static-capacity layers through the runtime's
`_hf_accel_kv_layer` hook) gives what `kvquant` alone gives in transformers' loop, holds quantized bytes, and falls
back where the runtime cannot serve the KV plugins (eviction policies, pre-filled caches).

Sensitivity: at bits=8 greedy tokens of these tiny models do not change under quantization at all, so token
equality alone would also pass for a layer that does not quantize. The layer test below therefore compares the K/V
that attention reads with `KVLayer`'s bit for bit at every step, and the logits test checks that the fast path's
logits follow kvquant's, not the unquantized model's. At bits=4 and 2 the tokens do change under quantization
(checked), and they are the same with and without `fast`.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import build
from test_runtime import padded_batch

import hf_accel
from hf_accel.errors import OptionError
from hf_accel.plugins.kv_cache import KVCache, KVQuant
from hf_accel.plugins.kv_cache._fast import QuantLayerFactory, QuantStaticLayer
from hf_accel.plugins.kv_cache._layers import dequantize, quantize
from hf_accel.runtime import bucket_capacity, get_runtime

SPEC = "kvquant(bits={bits}, group=16, residual={residual})"


def models(arch: str, spec: str):
    """(kvquant alone, the same weights with `spec+fast`)."""
    alone = build(arch)
    fast = copy.deepcopy(alone)
    hf_accel.apply(alone, spec)
    hf_accel.apply(fast, spec + "+fast")
    return alone, fast


def greedy(model, ids, mask, new: int, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)


def quant_layers(model):
    layers = [layer for s in get_runtime(model).sessions.values() for layer in s.cache.layers]
    assert layers and all(isinstance(layer, QuantStaticLayer) for layer in layers)
    return layers


# --- quantization: int2 packing, error bounds -----------------------------------------------------------------------

@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.12), (2, 0.5)])
def test_codes_pack_and_error_bounds(bits, bound):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 64, 32)
    codes, scale, lo = quantize(x, bits, 16)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 32 * bits // 8
    err = (dequantize(codes, scale, lo, bits, 16) - x).norm() / x.norm()
    assert err < bound
    levels = torch.round((x.reshape(2, 2, 64, 2, 16) - lo[..., None]) / scale[..., None]).reshape(2, 2, 64, 32)
    if bits == 4:  # the int4 layout kvquant always had: channel 2i in the low nibble, 2i + 1 in the high one
        assert torch.equal(codes, (levels[..., 0::2] + 16 * levels[..., 1::2]).to(torch.uint8))
    if bits == 2:
        assert torch.equal(codes, sum(levels[..., i::4] * 4 ** i for i in range(4)).to(torch.uint8))
    with pytest.raises(OptionError, match="multiple of 4"):
        KVQuant(bits=2, group=6)


# --- the layer: what attention reads, step by step, equals kvquant's own cache layer ----------------------------------

@pytest.mark.parametrize("bits,residual,prompt", [
    (8, 4, 20),   # prompt longer than the window: first flush at the prefill
    (4, 8, 21),
    (4, 24, 10),  # prompt inside the window: first flush (1 token) in decode
    (8, 16, 16),  # prompt exactly the window
    (8, 0, 1),    # no window, one-token prompt: the first flush (2 tokens) in the first decode step
    (4, 0, 7),
    (4, 3, 1),
    (2, 6, 30),
    (2, 0, 1),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_layer_reads_what_kvlayer_attends_to(bits, residual, prompt, dtype):
    torch.manual_seed(0)
    b, h, d, steps = 3, 2, 32, 90  # 90 decode steps: several 32-token flushes
    k = torch.randn(b, h, prompt + steps, d, dtype=dtype)
    k[..., 5] *= 20  # an outlier channel, as keys have
    v = torch.randn(b, h, prompt + steps, d, dtype=dtype)
    layer = QuantLayerFactory(bits, 16, residual, torch.nn.Module())(0, b, 256, h, d, dtype, torch.device("cpu"))
    ref = KVCache(1, None, KVQuant(bits=bits, group=16, residual=residual)).layers[0]
    for rows in (slice(0, 1), slice(1, b)):  # the runtime prefills long batches in groups of rows
        layer.prefill_rows = rows
        got = layer.update(k[rows, :, :prompt], v[rows, :, :prompt])
        assert torch.equal(got[0], k[rows, :, :prompt])  # the prompt attends to itself in full precision
    layer.prefill_rows = None
    ref.update(k[:, :, :prompt], v[:, :, :prompt])
    quantized = 0
    for s in range(prompt, prompt + steps):
        layer.slots = torch.tensor([s])
        gk, gv = layer.update(k[:, :, s:s + 1], v[:, :, s:s + 1])
        ek, ev = ref.update(k[:, :, s:s + 1], v[:, :, s:s + 1])
        assert gk.shape == (b, h, 256, d) and torch.isfinite(gk).all() and torch.isfinite(gv).all()
        assert torch.equal(gk[:, :, :s + 1], ek) and torch.equal(gv[:, :, :s + 1], ev), s
        quantized += not torch.equal(ek, k[:, :, :s + 1])
    assert quantized >= 30  # many steps read quantized slots (the test would notice a full-precision layer)


def test_static_layer_is_traceable_without_graph_breaks():
    """Capturable: the decode update has no host syncs, no data-dependent shapes and no Python branch on values, so
    torch.compile traces it as one graph (fullgraph=True raises on a graph break)."""
    torch._dynamo.reset()
    layer = QuantLayerFactory(4, 16, 4, torch.nn.Module())(0, 2, 256, 2, 32, torch.float32, torch.device("cpu"))
    layer.prefill_rows = slice(0, 2)
    layer.update(torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32))
    layer.prefill_rows = None
    compiled = torch.compile(lambda k, v, slots: (setattr(layer, "slots", slots), layer.update(k, v))[1],
                             backend="aot_eager", fullgraph=True)
    for s in (9, 10, 50):
        k, v = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)
        layer.slots = torch.tensor([s])
        eager = [t.clone() for t in layer.update(k, v)]
        got = compiled(k, v, torch.tensor([s]))
        assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


@pytest.mark.slow
def test_compiled_decode_step_matches_and_compiles_twice():
    """The torch.compile path (inductor's CPU backend): the quantized layers mark their capacity (and batch)
    symbolic, so five calls in four buckets cost two compiles (batch 1, batch >= 2), as with the bf16 cache, and
    the tokens stay kvquant's."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    alone, fast = models("llama", SPEC.format(bits=4, residual=4))
    rt = get_runtime(fast)
    rt._follow_model()  # picks up kvquant's factory (applied after `fast`), which resets the options
    rt.use_compile = True
    for seed, (lengths, new) in enumerate([([9], 8), ([300], 6), ([3, 7, 4], 8), ([200] * 5, 4), ([40], 30)]):
        ids, mask = padded_batch(lengths, seed)
        assert torch.equal(greedy(fast, ids, mask, new), greedy(alone, ids, mask, new)), lengths
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 2
    assert rt.stats["calls"] == 5 and rt.stats["fallbacks"] == 0 and not rt.warned


# --- generate: kvquant+fast == kvquant alone ------------------------------------------------------------------------

CALLS = [([5, 40, 17], 50), ([1], 40), ([3, 1], 33), ([200, 7], 70), ([260, 90, 13, 300], 12), ([30, 2], 45)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_greedy_equals_kvquant_alone(arch, bits):
    """Left-padded batches of different lengths, prompts in two capacity buckets (256, 320), batch buckets 1, 2 and 4;
    the runtime serves every call (no fallback) with its quantized layers."""
    alone, fast = models(arch, SPEC.format(bits=bits, residual=4))
    plain = build(arch)
    changed, buckets = 0, set()
    for seed, (lengths, new) in enumerate(CALLS):
        ids, mask = padded_batch(lengths, seed)
        expected = greedy(alone, ids, mask, new)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            got = greedy(fast, ids, mask, new)
        assert torch.equal(got, expected), lengths
        buckets |= set(get_runtime(fast).sessions)
        changed += int((greedy(plain, ids, mask, new) != expected).sum())
    rt = get_runtime(fast)
    assert rt.stats["calls"] == len(CALLS) and rt.stats["fallbacks"] == 0
    assert buckets == {(1, 256), (2, 256), (4, 256), (2, 320), (4, 320)}
    assert rt.pool.k == [] and rt.pool.v == []  # no full-precision pool next to the quantized layers
    quant_layers(fast)
    if bits < 8:  # quantization changes these tokens: the equality above is not the unquantized model's
        assert changed > 50


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "mistral"])
def test_other_architectures(arch):
    alone, fast = models(arch, SPEC.format(bits=4, residual=4))
    ids, mask = padded_batch([5, 40, 17], 3)
    assert torch.equal(greedy(fast, ids, mask, 50), greedy(alone, ids, mask, 50))
    assert get_runtime(fast).stats["calls"] == 1 and get_runtime(fast).stats["fallbacks"] == 0


def test_logits_follow_kvquant_not_the_unquantized_model():
    """bits=8 through the runtime's forward API: each step's logits equal kvquant's (transformers' forward over
    kvquant's own cache) to float32 rounding, and are far from the unquantized model's."""
    alone, fast = models("llama", SPEC.format(bits=8, residual=4))
    ids, mask = padded_batch([30, 11], 3)
    session, first = get_runtime(fast).start(ids, mask, max_new_tokens=60)
    cache = KVCache(alone.config.num_hidden_layers, None, KVQuant(bits=8, group=16, residual=4))
    plain_cache = None
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = alone(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        plain = alone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        plain_cache = plain.past_key_values
        assert (first - out.logits[:, -1]).abs().max() < 1e-5
        tok = first.argmax(-1, keepdim=True)
        worst, gap = 0.0, 0.0
        for _ in range(59):
            got = session.forward(tok)[:, -1]
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = pos[:, -1:] + 1
            want = alone(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
            unq = alone(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=plain_cache).logits[:, -1]
            worst, gap = max(worst, float((got - want).abs().max())), max(gap, float((got - unq).abs().max()))
            tok = want.argmax(-1, keepdim=True)
    assert cache.layers[0].quant.length > 40  # kvquant did quantize most of the sequence
    assert worst < 1e-5 and gap > 100 * worst, (worst, gap)


def test_forward_and_rewind():
    """The speculative-decoding API over quantized layers: a block of Q tokens, rewound, then one at a time; the
    first position agrees (each reads the same slots the same way), rewinding leaves nothing behind."""
    alone, fast = models("llama", SPEC.format(bits=4, residual=4))
    ids, mask = padded_batch([20, 9], 1)
    session, _ = get_runtime(fast).start(ids, mask, max_new_tokens=40)
    block = session.forward(torch.tensor([[5, 9, 17], [6, 7, 8]])).clone()
    session.rewind(3)
    again = session.forward(torch.tensor([[5, 9, 17], [6, 7, 8]])).clone()
    assert torch.equal(block, again)
    session.rewind(3)
    step = session.forward(torch.tensor([[5], [6]]))[:, -1]
    assert torch.allclose(step, block[:, 0], atol=1e-5)


# --- memory ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_memory_held_is_the_quantized_bytes(bits):
    """bf16 model, a 900-token prompt (capacity 1024): every layer holds codes (bits/8 bytes per element), a bf16
    scale and minimum per 16 channels, and the full-precision ring of residual + 32 + 16 tokens; nothing else (the
    runtime's bf16 pool stays empty)."""
    residual, group = 16, 16
    model = build("llama").to(torch.bfloat16)
    hf_accel.apply(model, SPEC.format(bits=bits, residual=residual) + "+fast")
    ids, mask = padded_batch([900, 700], 0)
    out = greedy(model, ids, mask, 8)
    assert out.shape == (2, 908)
    rt = get_runtime(model)
    assert rt.stats["calls"] == 1 and rt.stats["fallbacks"] == 0 and rt.pool.k == []
    layers = quant_layers(model)
    b, h, d, c = 2, rt.kv_heads, rt.head_dim, bucket_capacity(908)
    assert c == 1024
    ring = residual + 32 + 16
    per_layer = 2 * b * h * (c * (d * bits // 8 + 2 * 2 * d // group) + ring * d * 2 + d)  # K and V (+ channel)
    assert all(layer.nbytes() == per_layer for layer in layers)
    assert all(layer.t["kc"].dtype == torch.uint8 and layer.t["kc"].shape == (b, h, c, d * bits // 8) for layer in layers)
    bf16 = 2 * b * h * c * d * 2  # the same capacity in bf16 K/V
    held = model._hf_accel_kv_layer.nbytes()  # what the factory really allocated, every layer
    assert held == per_layer * len(layers)
    expected_ratio = bits / 16 + 2 * 2 / (2 * group) + ring / c + 1 / c  # codes + scales + ring + channel
    assert held / (bf16 * len(layers)) <= expected_ratio + 1e-9
    assert held < bf16 * len(layers) * {8: 0.69, 4: 0.44, 2: 0.32}[bits]


def test_buckets_share_the_factory_storage_and_release_frees_it():
    _, fast = models("llama", SPEC.format(bits=8, residual=4))
    factory = fast._hf_accel_kv_layer
    greedy(fast, *padded_batch([300], 0), 20)  # capacity 384
    big = factory.nbytes()
    greedy(fast, *padded_batch([10], 1), 20)  # capacity 256: views into the same storage
    assert factory.nbytes() == big and len(get_runtime(fast).sessions) == 2
    hf_accel.runtime.invalidate(fast)
    assert factory.nbytes() == 0 and not get_runtime(fast).sessions


# --- what stays in transformers' loop -------------------------------------------------------------------------------

def test_eviction_policy_with_kvquant_keeps_the_fallback():
    spec = "h2o(budget=60, recent=8)+kvquant(bits=8, group=16, residual=4)"
    alone, fast = models("llama", spec)
    ids, mask = padded_batch([40, 17], 2)
    expected = greedy(alone, ids, mask, 30)
    with pytest.warns(UserWarning, match=r"generate\((cache|past_key_values)=\.\.\.\) is not handled by the fast runtime"):
        got = greedy(fast, ids, mask, 30)
    assert torch.equal(got, expected)
    assert get_runtime(fast).stats["calls"] == 0 and not get_runtime(fast).sessions
    # no KV cache built (use_cache=False): the runtime asks kvquant's factory, which declines while a policy is on
    expected = greedy(alone, ids, mask, 6, use_cache=False)
    with pytest.warns(UserWarning, match="eviction policy 'h2o' has no layer for the fast runtime"):
        got = greedy(fast, ids, mask, 6, use_cache=False)
    assert torch.equal(got, expected) and get_runtime(fast).stats["fallbacks"] == 1


def test_fast_applied_after_the_kv_plugins():
    """`fast` applied in a later apply() wraps the KV plugins' generate: kvquant alone is still served, an eviction
    policy's cache (now reaching the decoding loop) still falls back."""
    for spec, served in [("kvquant(bits=4, group=16, residual=4)", True),
                         ("sink(window=40, sinks=2)+kvquant(bits=8, group=16, residual=4)", False)]:
        alone = build("llama")
        fast = copy.deepcopy(alone)
        hf_accel.apply(alone, spec)
        hf_accel.apply(fast, spec)
        hf_accel.apply(fast, "fast")
        ids, mask = padded_batch([50, 12], 4)
        expected = greedy(alone, ids, mask, 40)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = greedy(fast, ids, mask, 40)
        assert torch.equal(got, expected), spec
        stats = get_runtime(fast).stats
        assert (stats["calls"], stats["fallbacks"]) == ((1, 0) if served else (0, 1)), spec
        assert served or any("cannot serve" in str(w.message) for w in caught)


def test_fallback_calls_keep_quantizing_and_multi_turn_continues():
    """A call the runtime hands back (return_dict_in_generate) decodes with kvquant's own cache, and passing that
    cache back (the next turn) runs transformers' loop on it, exactly as kvquant alone."""
    alone, fast = models("llama", SPEC.format(bits=4, residual=4))
    ids, mask = padded_batch([30], 5)
    outs = []
    for model in (alone, fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = greedy(model, ids, mask, 20, return_dict_in_generate=True)
            turn = torch.cat([first.sequences, padded_batch([8], 6)[0]], 1)
            second = greedy(model, turn, torch.ones_like(turn), 10, return_dict_in_generate=True,
                            past_key_values=first.past_key_values)
        assert isinstance(second.past_key_values, KVCache) and second.past_key_values.layers[0].quant.length > 0
        outs.append((first.sequences, second.sequences))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert get_runtime(fast).stats["calls"] == 0 and get_runtime(fast).stats["fallbacks"] == 1
    # and the next plain call is served again
    assert torch.equal(greedy(fast, ids, mask, 20), greedy(alone, ids, mask, 20))
    assert get_runtime(fast).stats["calls"] == 1


def test_bad_options_and_remove():
    model = build("llama")
    with pytest.raises(OptionError, match="group=12 must divide the head dimension"):
        hf_accel.apply(model, "kvquant(group=12)+fast")
    with pytest.raises(OptionError, match="bits"):
        hf_accel.apply(model, "kvquant(bits=3)+fast")
    with pytest.raises(OptionError, match="residual"):
        hf_accel.apply(model, "kvquant(residual=-1)+fast")
    assert not hasattr(model, "_hf_accel_kv_layer") and get_runtime(model) is None
    hf_accel.apply(model, "kvquant(bits=8, group=16)+fast")
    assert isinstance(model._hf_accel_kv_layer, QuantLayerFactory)
    hf_accel.remove(model)
    assert not hasattr(model, "_hf_accel_kv_layer") and get_runtime(model) is None


def test_deep_copy_gets_its_own_factory():
    model = build("llama")
    hf_accel.apply(model, "kvquant(bits=8, group=16)+fast")
    greedy(model, *padded_batch([9], 0), 4)
    twin = copy.deepcopy(model)
    assert twin._hf_accel_kv_layer is not model._hf_accel_kv_layer and twin._hf_accel_kv_layer.model() is twin
    assert twin._hf_accel_kv_layer.nbytes() == 0 < model._hf_accel_kv_layer.nbytes()
