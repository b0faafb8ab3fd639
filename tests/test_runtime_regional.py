"""`fast(compile="regional")`: one compiled decoder layer serves every layer (hf_accel/runtime/regional.py).

On the CPU the compile path is forced (`rt.use_compile = True`); the graph counts use dynamo's "eager" backend
(tracing and guards without code generation), the token checks inductor's CPU backend. Sensitivity: the naive
regional compile (each layer's own forward compiled, the whole cache passed in) recompiles once per layer on the
attention's `layer_idx` (until `recompile_limit`), so the graph count grows with the layer count and
`test_regional_graph_count_does_not_grow_with_layers` fails; a full compile's traced ops grow with the layers, which
that test also checks, so the counters see the layers at all.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from conftest import VOCAB
from test_runtime import padded_batch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_accel
from hf_accel.runtime import get_runtime

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

# batch 1 and left-padded batches over several capacity and batch buckets
CALLS = [([9], 8), ([300], 6), ([3, 7, 4], 8), ([200] * 5, 4), ([40], 30)]


def llama(layers: int, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def on_compile_path(model, backend: str = "eager"):
    """The runtime of `model`, set to compile on the CPU with `backend` (its options and KV factory picked up)."""
    rt = get_runtime(model)
    rt._follow_model()
    rt.use_compile = True
    rt.compile_backend = backend
    return rt


def greedy(model, ids, mask, new: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def reference_tokens(reference, calls=CALLS) -> list[torch.Tensor]:
    """`reference`'s greedy tokens on each of `calls` (eager transformers), to check compiled runs against."""
    return [greedy(reference, *padded_batch(lengths, seed), new) for seed, (lengths, new) in enumerate(calls)]


def compiled_calls(reference, model, calls=CALLS, want=None) -> dict:
    """Run `calls` on `model` (on the compile path), assert its tokens are `reference`'s (or `want`, the
    reference's tokens computed once by `reference_tokens` for several compiled models), return dynamo's counts."""
    want = reference_tokens(reference, calls) if want is None else want
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    for seed, (lengths, new) in enumerate(calls):
        ids, mask = padded_batch(lengths, seed)
        assert torch.equal(greedy(model, ids, mask, new), want[seed]), lengths
    stats = dynamo_utils.counters["stats"]
    rt = get_runtime(model)
    assert rt.stats["fallbacks"] == 0 and not rt.warned, rt.warned
    # regional: compiled entries per region function (1 = compiled once, never recompiled)
    entries = rt._regions.compiled_entries() if rt._regions is not None else {}
    return {"graphs": stats["unique_graphs"], "ops_traced": stats["calls_captured"], "entries": entries}


def with_fast(model, spec: str = "fast(compile=regional)", backend: str = "eager"):
    fast = copy.deepcopy(model)
    hf_accel.apply(fast, spec)
    on_compile_path(fast, backend)
    return fast


# --- the option ----------------------------------------------------------------------------------------------------

def test_compile_option_values():
    from hf_accel.runtime import Runtime

    for value, mode in (("regional", "regional"), ("full", "full"), ("true", "full"), ("false", None)):
        model = llama(2)
        hf_accel.apply(model, f"fast(compile={value})")
        assert get_runtime(model).compile_mode == mode, value
    with pytest.raises(hf_accel.OptionError, match="'full' \\| 'regional'"):
        hf_accel.apply(llama(2), "fast(compile=layers)")
    with pytest.raises(ValueError, match="True, False, 'full', 'regional'"):
        Runtime(llama(2), compile="layers")


# --- graphs and recompiles ------------------------------------------------------------------------------------------

def test_regional_graph_count_does_not_grow_with_layers():
    """2 and 6 layers, five calls over four buckets: the regional compile traces the same graphs (mask, layer,
    rotary, final norm, lm_head; batch 1 and symbolic batch) and the same ops whatever the depth, with no
    recompile; the full compile's traced ops grow with the depth. Tokens are transformers'."""
    regional, full = {}, {}
    for layers in (2, 6):
        ref = llama(layers)
        want = reference_tokens(ref)
        regional[layers] = compiled_calls(ref, with_fast(ref), want=want)
        full[layers] = compiled_calls(ref, with_fast(ref, "fast(compile=full)"), want=want)
    assert regional[2] == regional[6], regional
    assert regional[2]["graphs"] == 10 and set(regional[2]["entries"].values()) == {1}, regional
    assert full[2]["graphs"] == full[6]["graphs"] == 2, full
    assert full[6]["ops_traced"] > 2 * full[2]["ops_traced"] > 2 * regional[2]["ops_traced"], (full, regional)


@pytest.mark.parametrize("spec", ["kvquant(bits=4, group=16, residual=4)", "snapkv(budget=24, window=4, slack=0)",
                                  "sink(window=16, sinks=2, slack=5)"])
def test_kv_plugin_layers_do_not_recompile_per_layer(spec):
    """A KV plugin's layers (kvquant's QuantStaticLayer, the eviction plugins' EvictStaticLayer) are different
    objects per layer with the same Python state on the decode path: no guard fails from one layer to the next, so
    the graph count does not grow with the depth. Tokens are the plugin's alone."""
    counts = {}
    for layers in (2, 5):
        alone = llama(layers)
        fast = copy.deepcopy(alone)
        hf_accel.apply(alone, spec)
        hf_accel.apply(fast, spec + "+fast(compile=regional)")
        on_compile_path(fast)
        counts[layers] = compiled_calls(alone, fast, [([60], 8), ([70, 30, 55], 8), ([40], 30)])
    assert counts[2] == counts[5] and set(counts[2]["entries"].values()) == {1}, counts


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma", "gpt2"])
def test_other_architectures(arch):
    """The regions are found by structure (the decoder layers' ModuleList, rotary_emb, norm / ln_f, the output
    embeddings); GPT-2 passes the cache to its blocks positionally. Tokens are transformers', one entry per region."""
    from conftest import build

    ref = build(arch, seed=3)
    counts = compiled_calls(ref, with_fast(ref), [([9], 8), ([4, 11, 7], 8)])
    assert counts["entries"] and set(counts["entries"].values()) == {1}, counts


def test_the_model_is_left_as_it_was():
    """The regions are routed for the duration of a step only: no module keeps an instance `forward`, and the
    eager prefill of the next call runs the modules' own code."""
    ref = llama(3)
    fast = with_fast(ref)
    compiled_calls(ref, fast, CALLS[:1])
    assert not [name for name, m in fast.named_modules() if "forward" in m.__dict__]


def test_models_sharing_kv_across_layers_get_the_full_compile():
    ref = llama(2)
    ref.config.num_kv_shared_layers = 1  # Gemma-3n style: a one-layer cache view would serve it wrongly
    fast = copy.deepcopy(ref)
    hf_accel.apply(fast, "fast(compile=regional)")
    rt = on_compile_path(fast)
    ids, mask = padded_batch([9], 0)
    with pytest.warns(UserWarning, match="full compile"):
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, greedy(ref, ids, mask, 4)) and rt.compile_mode == "full"


# --- speculative steps: verify (per row) and draft trees ------------------------------------------------------------

def test_regional_verify_and_tree_steps_are_exact():
    """`Session.forward` with Q tokens per row and with a draft tree run through the same regions (their own compiled
    entries): logits and hidden states equal the eager runtime's, and `fast(compile=regional)+lookup` keeps the
    target's greedy tokens."""
    from hf_accel.plugins.speculative.medusa import build_tree, parse_tree

    target = llama(3, seed=1)
    eager = copy.deepcopy(target)
    hf_accel.apply(eager, "fast")
    regional = with_fast(target)
    tree = build_tree(parse_tree("2,2", 2))
    ids, mask = padded_batch([4, 9], 3)
    nodes = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    outputs = []
    for model in (eager, regional):
        session, _ = get_runtime(model).start(ids, mask, max_new_tokens=20, per_row=True)
        logits, hidden = session.forward(nodes, tree=tree.parents)
        chain = session.forward(nodes[:, :3])
        outputs.append((logits.clone(), hidden.clone(), chain.clone()))
    for want, got in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    spec = copy.deepcopy(target)
    hf_accel.apply(spec, "fast(compile=regional)+lookup(k=3)")
    on_compile_path(spec)
    ids, mask = padded_batch([5, 11, 8], 4)
    out = spec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, greedy(target, ids, mask, 12)) and spec.hf_accel_spec_stats["runtime"]


# --- inductor: the tokens of the compiled code ------------------------------------------------------------------------

@pytest.mark.slow
def test_regional_and_full_inductor_match_eager_on_the_tiny_reference():
    """inductor's CPU backend (about a minute): on the trained tiny reference model (4 layers, tied embeddings),
    regional and full compiles give transformers' greedy tokens, batch 1 and a left-padded batch."""
    from hf_accel.quality.reference import load_reference

    ref, _ = load_reference("tiny")
    calls = [([17], 12), ([5, 23, 11], 12)]
    want = reference_tokens(ref, calls)
    counts = {mode: compiled_calls(ref, with_fast(ref, f"fast(compile={mode})", "inductor"), calls, want)
              for mode in ("regional", "full")}
    assert counts["regional"]["graphs"] == 10 and counts["full"]["graphs"] == 2, counts


# --- GPU: CUDA graphs over the compiled regions ---------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_regional_graphs_match_transformers():
    """SDPA decode attention (transformers' own kernel): exact tokens even on random weights; every region compiled
    once per batch class (no recompile across layers or buckets), and the compile + capture time recorded."""
    from conftest import build

    ref = build("llama").cuda()
    fast = copy.deepcopy(ref)
    hf_accel.apply(fast, "fast(compile=regional, decode_attention=sdpa)")
    for seed, lengths in enumerate([[9], [4, 11, 7], [16, 16], [30, 2, 5, 8, 1]]):
        ids, mask = padded_batch(lengths, seed)
        ids, mask = ids.cuda(), mask.cuda()
        assert torch.equal(greedy(fast, ids, mask, 10), greedy(ref, ids, mask, 10)), lengths
    rt = get_runtime(fast)
    assert rt.stats["captures"] >= 2 and rt.seconds["warmup"] > 0 and rt.seconds["capture"] > 0
    assert set(rt._regions.compiled_entries().values()) == {1}, rt._regions.compiled_entries()


@pytest.mark.gpu
def test_gpu_regional_default_attention_matches_transformers_on_trained_model():
    """The default matmul decode attention on the trained tiny reference (fp32): transformers' tokens exactly,
    left-padded batches included (as `test_gpu_default_attention_matches_transformers_on_trained_model`)."""
    from hf_accel.quality.agreement import heldout_prompts
    from hf_accel.quality.reference import load_reference

    torch.backends.cuda.matmul.allow_tf32 = False
    ref, tok = load_reference("tiny", device="cuda")
    fast = copy.deepcopy(ref)
    hf_accel.apply(fast, "fast(compile=regional)")
    prompts = heldout_prompts(tok, 24, 48)
    for lengths in ([48] * 8, [48, 20, 33, 5, 41, 12, 48, 27], [17]):
        ids = prompts[: len(lengths)].clone()
        mask = torch.ones_like(ids)
        for i, n in enumerate(lengths):  # left padding: the first 48 - n tokens of row i become pads
            ids[i, : 48 - n], mask[i, : 48 - n] = tok.pad_token_id, 0
        prompts = prompts[len(lengths):]
        ids, mask = ids.cuda(), mask.cuda()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                            pad_token_id=tok.pad_token_id)
        assert torch.equal(expected, got), lengths
    assert set(get_runtime(fast)._regions.compiled_entries().values()) == {1}


@pytest.mark.gpu
def test_gpu_regional_speculative_tree_and_verify():
    """The tree and per-row verify steps captured over the regions: the same outputs as the uncompiled runtime's
    graphs (fp32, tolerance for inductor's reduction order)."""
    from hf_accel.plugins.speculative.medusa import build_tree, parse_tree

    torch.backends.cuda.matmul.allow_tf32 = False
    target = llama(3, seed=1).cuda()
    tree = build_tree(parse_tree("2,2", 2))
    ids, mask = padded_batch([4, 9], 3)
    nodes = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]]).cuda()
    outputs = []
    for spec in ("fast(compile=false)", "fast(compile=regional)"):
        model = copy.deepcopy(target)
        hf_accel.apply(model, spec)
        session, _ = get_runtime(model).start(ids.cuda(), mask.cuda(), max_new_tokens=20, per_row=True)
        logits, hidden = session.forward(nodes, tree=tree.parents)
        chain = session.forward(nodes[:, :3])
        outputs.append((logits.clone(), hidden.clone(), chain.clone()))
    for want, got in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
