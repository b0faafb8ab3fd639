"""Speculative decoding on the fast runtime (`fast+draft`, `fast+lookup`, ...; issue 7): the target, and a draft model,
verify and draft through per-row runtime sessions instead of the eager `RowCache`.

Greedy output is compared token for token with the target alone (fp32 CPU, batch 1 and left-padded batches whose rows
accept different numbers of drafts); sampled output with the target's exact distribution (the chi-square test of
test_speculative.py); Medusa's trees verify on the runtime too (tree forward, `Session.move`); fallbacks (KV layers
without per-row slots or movable slots, unservable calls) keep the output.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import build
from test_medusa import random_heads
from test_speculative import (WARP, chi_square_p, n_generated, prompts, sample_counts, small_pair,  # noqa: F401
                              smaller_perturbed_copy, total_variation)

import hf_accel
from hf_accel.runtime import StaticKVLayer, get_runtime

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

METHODS = ("draft", "lookup", "recycle", "selfdraft")


def spec_for(method: str, draft_dir, fast: str = "fast") -> str:
    return fast + "+" + {
        "draft": f"draft(draft='{draft_dir}', k=3)",
        "lookup": "lookup(k=4)",
        "recycle": "recycle(k=3)",
        "selfdraft": "selfdraft(k=3)",
    }[method]


@pytest.fixture(scope="module")
def target():
    return build("llama", seed=0)


@pytest.fixture(scope="module")
def draft_dir(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec_fast") / "draft"
    smaller_perturbed_copy(target, layers=1, noise=0.3).save_pretrained(path)
    return path


def generate_on_runtime(model, spec, **kw):
    """generate() under `spec`, failing on any warning (a silent fallback); returns (ids, stats, draft sessions)."""
    hf_accel.apply(model, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            out = model.generate(**kw)
        companions = get_runtime(model).companions.values()
        return out, dict(model.hf_accel_spec_stats), sum(len(rt.sessions) for rt in companions)
    finally:
        hf_accel.remove(model)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_identical_to_target(target, draft_dir, method, batch):
    rounds = generated = 0
    for seed in range(3):
        ids, mask = prompts(batch, seed)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
        ref = target.generate(**kw)
        out, stats, draft_sessions = generate_on_runtime(target, spec_for(method, draft_dir), **kw)
        assert torch.equal(out, ref), f"{method} batch {batch} prompt set {seed}"
        assert stats["runtime"] and stats["generated"] == n_generated(ref, ids.shape[1])
        assert draft_sessions == (method in ("draft", "selfdraft"))  # a draft model decodes on its own runtime
        rounds += stats["row_rounds"]
        generated += stats["generated"]
    assert rounds < generated  # drafts were accepted at times
    assert "generate" not in vars(target) and not hasattr(target, "_hf_accel_runtime")


def test_ragged_batch_accepts_different_counts_per_row(target, draft_dir, monkeypatch):
    """The batch-of-3 case really is ragged: rows keep different numbers of drafts in the same round."""
    from hf_accel.plugins.speculative import decode

    log, right = [], decode.Batch.advance

    def spy(self, counts):  # tokens each row commits in a round (no EOS here: accepted + 1, or its budget's rest)
        log.append(list(counts))
        return right(self, counts)

    monkeypatch.setattr(decode.Batch, "advance", spy)
    ids, mask = prompts(3, seed=1, lengths=[3, 11, 7])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None)
    out, _, _ = generate_on_runtime(target, spec_for("draft", draft_dir), **kw)
    assert torch.equal(out, target.generate(**kw))
    assert any(len(set(acc)) > 1 for acc in log)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_greedy_other_architectures(arch, tmp_path):
    model = build(arch, seed=0)
    path = tmp_path / "draft"
    smaller_perturbed_copy(model, layers=2, noise=0.3).save_pretrained(path)  # qwen2: layer_types need 2
    for batch in (1, 3):
        ids, mask = prompts(batch, seed=11)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
        ref = model.generate(**kw)
        for method in ("draft", "lookup"):
            out, stats, _ = generate_on_runtime(model, spec_for(method, path), **kw)
            assert torch.equal(out, ref) and stats["runtime"], f"{arch} {method} batch {batch}"


def test_eos_and_budget_per_row(target, draft_dir):
    ids, mask = prompts(3, seed=7)
    free = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    eos = int(free[0, 6])  # an EOS id that rows reach at different steps (or never)
    for max_new in (1, 5, 20):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=eos)
        ref = target.generate(**kw)
        out, stats, _ = generate_on_runtime(target, spec_for("draft", draft_dir), **kw)
        assert torch.equal(out, ref) and stats["generated"] == n_generated(ref, ids.shape[1], eos), max_new


def test_session_rewinds_each_row_by_its_own_count(target):
    """`Runtime.start(per_row=True)`: rows rewound by different counts continue exactly like transformers."""
    model = copy.deepcopy(target)
    hf_accel.apply(model, "fast")
    ids, mask = prompts(2, seed=3, lengths=[4, 9])
    session, _ = get_runtime(model).start(ids, mask, max_new_tokens=20, per_row=True)
    session.forward(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    session.rewind(torch.tensor([1, 3]))  # row 0 keeps 5, 6; row 1 keeps nothing
    logits = session.forward(torch.tensor([[11, 12], [13, 14]])).clone()
    for row, (new, n) in enumerate([([5, 6, 11, 12], 4), ([13, 14], 9)]):
        seq = torch.cat([ids[row, ids.shape[1] - n:], torch.tensor(new)])[None]
        assert torch.allclose(logits[row], model(seq).logits[0, -2:].float(), atol=1e-5)
    hf_accel.remove(model)


def test_per_row_forward_traces_as_one_graph(target):
    """Capturable: the per-row verify step (scatter at [B, Q] slots, the per-row mask) has no host sync and no
    data-dependent branch, so torch.compile traces the whole model forward as one graph (fullgraph=True)."""
    from hf_accel.runtime.attention import use_fast_attention
    from hf_accel.runtime.session import forward_tokens

    model = copy.deepcopy(target)
    hf_accel.apply(model, "fast")
    rt = get_runtime(model)
    ids, mask = prompts(2, seed=3, lengths=[4, 9])
    session, _ = rt.start(ids, mask, max_new_tokens=20, per_row=True)
    st = session.state
    session.rewind(torch.tensor([0, 2]))
    slots, pos = st.row_slot + torch.arange(3), st.positions + torch.arange(3)
    session.cache.set_slots(slots)
    args = (model, session.cache, torch.tensor([[5, 6, 7], [8, 9, 10]]), pos, slots, st.prompt_valid, st.prompt_len,
            rt.window, rt.kind, rt.dtype)
    torch._dynamo.reset()
    with use_fast_attention(model):
        eager = forward_tokens(*args).clone()  # writes the same K/V at the same slots as the traced call
        traced = torch.compile(forward_tokens, backend="eager", fullgraph=True)(*args)
    assert torch.allclose(traced, eager, atol=1e-6)
    hf_accel.remove(model)


@pytest.mark.slow
def test_compiled_per_row_step_on_cpu(target):
    """The torch.compile path (inductor's CPU backend, 10-25 s): per-row verify steps of batch 3 and 2 share one
    compile (batch symbolic, as for the decode step) and the tokens stay the target's."""
    import torch._dynamo.utils as dynamo_utils

    model = copy.deepcopy(target)
    torch._dynamo.reset()
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for batch, seed in ((3, 1), (2, 2)):
        ids, mask = prompts(batch, seed)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        ref = model.generate(**kw)
        hf_accel.apply(model, "fast+lookup(k=3)")
        rt = get_runtime(model)
        rt._follow_model()
        rt.use_compile = True
        try:
            out = model.generate(**kw)
            assert torch.equal(out, ref) and model.hf_accel_spec_stats["runtime"]
        finally:
            hf_accel.remove(model)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 1


@pytest.mark.parametrize("method", ["draft", "lookup"])
def test_sampling_follows_target_distribution(small_pair, method):
    target, path, prompt, exact = small_pair
    spec = f"fast+draft(draft='{path}', k=2)" if method == "draft" else "fast+lookup(k=2)"
    hf_accel.apply(target, spec)
    try:
        torch.manual_seed(1)
        counts = sample_counts(target, prompt, **WARP)
        stats = dict(target.hf_accel_spec_stats)
    finally:
        hf_accel.remove(target)
    assert stats["runtime"] and stats["sampling"] and 0.1 < stats["acceptance_rate"] < 0.9
    assert chi_square_p(counts, exact) > 1e-3
    assert total_variation(counts, exact) < 0.06


def test_remove_restores_everything(target, draft_dir):
    before = target.generate
    hf_accel.apply(target, spec_for("draft", draft_dir))
    ids, mask = prompts(3, seed=2)
    target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert get_runtime(target).companions
    assert hf_accel.remove(target) == []
    assert target.generate == before and "generate" not in vars(target)
    assert get_runtime(target) is None and not hasattr(target, "hf_accel_spec_stats")
    assert not hasattr(target, "_hf_accel_state")


def test_unservable_call_goes_to_the_runtime_loop(target):
    """A call speculative decoding cannot serve (repetition penalty) runs the fast runtime's own loop."""
    model = copy.deepcopy(target)
    ids, mask = prompts(3, seed=6)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
    ref = model.generate(**kw)
    hf_accel.apply(model, "fast+lookup")
    with pytest.warns(UserWarning, match="RepetitionPenalty"):
        out = model.generate(**kw)
    assert torch.equal(out, ref) and get_runtime(model).stats["calls"] == 1
    hf_accel.remove(model)


# ------------------------------------------------------------------------------------------------ medusa trees
@pytest.fixture(scope="module")
def medusa_heads(target, tmp_path_factory):
    """(random heads, briefly trained heads): the trained ones on the target's own greedy text (repetitive for a
    random model), so that trees accept paths of several tokens at times."""
    from hf_accel.plugins.speculative.medusa import save_heads, train_medusa

    folder = tmp_path_factory.mktemp("medusa_fast")
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(3, 128, (16, 4), generator=g)
    stream = target.generate(input_ids=starts, attention_mask=torch.ones_like(starts), max_new_tokens=60,
                             do_sample=False, eos_token_id=None).reshape(-1)
    torch.manual_seed(0)
    heads, _ = train_medusa(target, stream=stream, heads=3, steps=150, seq_len=32, batch=8, lr=1e-2)
    save_heads(heads, folder / "trained")
    return random_heads(target, folder / "random"), folder / "trained"


def medusa_spec(heads, tree: str, fast: str = "fast") -> str:
    return f"{fast}+medusa(heads='{heads}', tree='{tree}')"


@pytest.mark.parametrize("tree", ["default", "3,2,1", "1,1,1"])  # sparse, wide, chain
@pytest.mark.parametrize("batch", [1, 3])
def test_medusa_greedy_identical_on_the_runtime(target, medusa_heads, tree, batch, monkeypatch):
    """`fast+medusa`: the tree verify runs on the runtime's per-row session (tree mask, positions by depth, the
    accepted path moved to contiguous slots); greedy output equals the target's, random and trained heads, and the
    trained heads keep paths of more than one draft at times."""
    from hf_accel.plugins.speculative import decode

    depths, right = [], decode.verify_tree

    def spy(*args):
        out = right(*args)
        depths.extend(out[1].tolist())
        return out

    monkeypatch.setattr(decode, "verify_tree", spy)
    for heads in medusa_heads:
        for seed in range(2):
            ids, mask = prompts(batch, seed)
            kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
            ref = target.generate(**kw)
            out, stats, _ = generate_on_runtime(target, medusa_spec(heads, tree), **kw)
            assert torch.equal(out, ref), f"{heads.name} {tree} batch {batch} prompt set {seed}"
            assert stats["runtime"] and stats["generated"] == n_generated(ref, ids.shape[1])
    assert max(depths) >= 2  # a path of two drafts or more was kept


def test_medusa_tree_forward_and_move_are_exact(target):
    """Session level: every tree node's logits and hidden state are the target's on the node's own path; after
    `move` + `rewind`, each row's cache holds exactly the K/V that decoding the accepted tokens one by one writes,
    and the next forward continues exactly (rows of different lengths, different paths per row)."""
    from hf_accel.plugins.speculative.medusa import build_tree, parse_tree

    model = copy.deepcopy(target)
    hf_accel.apply(model, "fast")
    rt = get_runtime(model)
    tree = build_tree(parse_tree("2,2", 2))  # nodes: 0 root; 1, 2 depth 1; 3, 4 under 1; 5, 6 under 2
    ids, mask = prompts(2, seed=3, lengths=[4, 9])
    t = ids.shape[1]
    nodes = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    session, _ = rt.start(ids, mask, max_new_tokens=20, per_row=True)
    logits, hidden = session.forward(nodes, tree=tree.parents)
    decoder = model.get_decoder()
    for row, n in enumerate([4, 9]):
        prompt = ids[row, t - n:]
        for node in range(7):
            path = [i for i in range(7) if tree.visible[node, i]]  # its ancestors and itself, in node order
            seq = torch.cat([prompt, nodes[row, path]])[None]
            assert torch.allclose(logits[row, node], model(seq).logits[0, -1].float(), atol=1e-5), (row, node)
            assert torch.allclose(hidden[row, node], decoder(seq).last_hidden_state[0, -1], atol=1e-5)
    paths = torch.tensor([[0, 2, 5], [0, 1, 0]])  # row 0 keeps nodes 2 and 5; row 1 keeps node 1 only
    kept = torch.tensor([2, 1])
    session.move(t + paths, t + torch.arange(3))
    session.rewind(7 - 1 - kept)  # the next slot follows the kept path
    layers = [(layer.keys[:, :, : t + 3].clone(), layer.values[:, :, : t + 3].clone()) for layer in session.cache.layers]
    after = session.forward(torch.tensor([[20, 21], [22, 23]])).clone()
    plain, _ = rt.start(ids, mask, max_new_tokens=20, per_row=True)  # the same bucket: the same storage
    plain.forward(torch.tensor([[5, 7, 10], [12, 13, 0]]))
    plain.rewind(torch.tensor([0, 1]))
    for (k, v), layer in zip(layers, plain.cache.layers):
        for row, n in enumerate([3, 2]):  # root + kept drafts
            assert torch.allclose(k[row, :, : t + n], layer.keys[row, :, : t + n], atol=1e-5)
            assert torch.allclose(v[row, :, : t + n], layer.values[row, :, : t + n], atol=1e-5)
    for row, new in enumerate([[5, 7, 10, 20, 21], [12, 13, 22, 23]]):
        seq = torch.cat([ids[row, t - [4, 9][row]:], torch.tensor(new)])[None]
        assert torch.allclose(after[row], model(seq).logits[0, -2:].float(), atol=1e-5)
    hf_accel.remove(model)


def test_tree_forward_traces_as_one_graph(target):
    """Capturable: the tree verify (ancestor mask from device buffers, hidden states out) traces as one graph."""
    from hf_accel.plugins.speculative.medusa import build_tree, parse_tree
    from hf_accel.runtime.attention import use_fast_attention
    from hf_accel.runtime.session import forward_tree

    model = copy.deepcopy(target)
    hf_accel.apply(model, "fast")
    rt = get_runtime(model)
    ids, mask = prompts(2, seed=3, lengths=[4, 9])
    session, _ = rt.start(ids, mask, max_new_tokens=20, per_row=True)
    parents = build_tree(parse_tree("2,1", 2)).parents
    key, (tok, slots, pos, _, _, offsets, depth, visible) = session._tree_buffers(parents)
    st = session.state
    tok.copy_(torch.randint(3, 128, tok.shape))
    slots.copy_(st.row_slot + offsets)
    pos.copy_(st.positions + depth)
    session.cache.set_slots(slots)
    args = (model, session.cache, tok, pos, slots, st.row_slot, depth, visible, st.prompt_valid, st.prompt_len,
            rt.window, rt.kind, rt.dtype)
    torch._dynamo.reset()
    with use_fast_attention(model):
        eager = [x.clone() for x in forward_tree(*args)]
        traced = torch.compile(forward_tree, backend="eager", fullgraph=True)(*args)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(traced, eager))
    hf_accel.remove(model)


def test_medusa_kv_layers_that_cannot_move_slots_fall_back(target, medusa_heads):
    """A KV plugin's layers without `move_slots`: medusa runs on the eager cache (one warning), exact."""

    class FixedLayer(StaticKVLayer):
        pass

    def factory(layer_idx, batch, capacity, kv_heads, head_dim, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        return FixedLayer(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    model = copy.deepcopy(target)
    ids, mask = prompts(3, seed=4)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    ref = model.generate(**kw)
    hf_accel.apply(model, medusa_spec(medusa_heads[1], "default"))
    model._hf_accel_kv_layer = factory
    try:
        with pytest.warns(UserWarning, match="move_slots"):
            out = model.generate(**kw)
        assert torch.equal(out, ref) and not model.hf_accel_spec_stats["runtime"]
    finally:
        del model._hf_accel_kv_layer
        hf_accel.remove(model)


def test_medusa_sampling_follows_target_distribution():
    """Sampled `fast+medusa` output has the target's exact distribution (test_medusa's 6-token test)."""
    from test_medusa import exact_distribution, sample_counts as medusa_counts, small_vocab_model

    target = small_vocab_model(0)
    torch.manual_seed(4)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = random_heads(target, f"{folder}/h", num_heads=2, std=0.5)
        prompt = torch.tensor([[1, 3, 2, 5, 4, 3, 2]])
        hf_accel.apply(target, f"fast+medusa(heads='{path}', tree='3,2')")
        try:
            counts = medusa_counts(target, prompt, seed=1)
            stats = dict(target.hf_accel_spec_stats)
        finally:
            hf_accel.remove(target)
    exact = exact_distribution(target, prompt)
    assert stats["runtime"] and stats["sampling"] and stats["accepted"] > 0
    assert chi_square_p(counts, exact) > 1e-3
    assert total_variation(counts, exact) < 0.06


@pytest.mark.slow
def test_compiled_medusa_tree_on_cpu(target, medusa_heads):
    """The torch.compile path (inductor on the CPU) of the tree verify and the move: batch 3 and 1, tokens exact."""
    model = copy.deepcopy(target)
    torch._dynamo.reset()
    for batch, seed in ((3, 1), (1, 2)):
        ids, mask = prompts(batch, seed)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        ref = model.generate(**kw)
        hf_accel.apply(model, medusa_spec(medusa_heads[1], "3,2,1"))
        rt = get_runtime(model)
        rt._follow_model()
        rt.use_compile = True
        try:
            out = model.generate(**kw)
            assert torch.equal(out, ref) and model.hf_accel_spec_stats["runtime"]
            assert model.hf_accel_spec_stats["accepted"] > 0 or batch == 1
        finally:
            hf_accel.remove(model)


def test_failure_mid_call_reruns_on_the_eager_cache(target, draft_dir, monkeypatch):
    """A forward the runtime cannot run (on the GPU: a failed capture of a new Q) after some rounds: the call is run
    again on the eager cache (one warning), the failing runtime (here the draft's) is not tried again, the output
    stays exact."""
    from hf_accel.runtime import Session, Unsupported

    right, right_chain, calls = Session.forward, Session.chain, []

    def forward(self, tokens):
        calls.append(tokens.shape)
        return right(self, tokens)

    def failing_chain(self, tokens, k):  # the draft's greedy steps (one call per round)
        calls.append(("chain", *tokens.shape, k))
        if sum(call[0] == "chain" for call in calls) == 3:
            raise Unsupported("could not capture the test step")
        return right_chain(self, tokens, k)

    monkeypatch.setattr(Session, "forward", forward)
    monkeypatch.setattr(Session, "chain", failing_chain)
    model = copy.deepcopy(target)
    hf_accel.apply(model, spec_for("draft", draft_dir))
    ids, mask = prompts(3, seed=8)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    with pytest.warns(UserWarning, match="could not capture the test step"):
        out = model.generate(**kw)
    assert torch.equal(out, target.generate(**kw)) and not model.hf_accel_spec_stats["runtime"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # one warning per reason: the next call is quiet
        assert torch.equal(model.generate(**kw), target.generate(**kw))
    failed = [i for i, call in enumerate(calls) if call[0] == "chain"][2]
    assert calls[failed] == ("chain", 3, 2, 3)  # the draft's third round failed: its runtime is disabled,
    assert all(call[0] != "chain" for call in calls[failed + 1:])  # it drafts on the eager cache; the target
    assert all(shape == (3, 4) for shape in calls[failed + 1:])  # still verifies on the runtime
    assert model.hf_accel_spec_stats["runtime"]
    hf_accel.remove(model)


def test_chain_capture_retries_eagerly_from_the_saved_slots(target, monkeypatch):
    """`Session.chain` on the CUDA-graph path, simulated on the CPU (streams, capture and replay stand-ins; the
    capture runs the step once): torch.compile fails at the chain's one-token sub-step, after the Q0-token sub-step
    advanced the slots. `_capture` uncompiles and retries: the retry must take the eager step (the chain once kept
    the compiled one and failed again) and start from the saved slots (it once started Q0 slots later and wrote
    past the session's capacity). Drafts and slots then equal an eager chain's."""
    import contextlib

    from hf_accel.runtime.session import forward_tokens

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):  # the capture ran the step for real (below), so a replay has nothing left to do
            pass

    stream = Stream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())

    def compiled(model, cache, tokens, *args):  # the Q0-token forward compiles, the one-token one fails
        if tokens.shape[1] == 1:
            raise RuntimeError("simulated compile failure")
        return forward_tokens(model, cache, tokens, *args)

    ids, mask = prompts(1, seed=2, lengths=[252])
    tokens, results = ids[:, -2:], []  # slots 250 .. 254 of 256: a chain started 2 slots late writes slot 256
    for graphs in (False, True):
        model = copy.deepcopy(target)
        hf_accel.apply(model, "fast")
        rt = get_runtime(model)
        session, _ = rt.start(ids[:, :-2], mask[:, :-2], max_new_tokens=6)
        assert session.capacity == 256
        if graphs:
            rt.use_graphs = rt.use_compile = True
            rt._forward = {True: compiled}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            drafts = session.chain(tokens, 4).clone()
        st = session.state
        results.append((drafts, st.slot.clone(), st.positions.clone()))
        if graphs:
            assert not rt.use_compile and any("torch.compile failed" in str(w.message) for w in caught)
        hf_accel.remove(model)
    (eager, slot, pos), (captured, slot_c, pos_c) = results
    assert torch.equal(captured, eager) and torch.equal(slot_c, slot) and torch.equal(pos_c, pos)
    assert int(slot) == 250 + 2 + 4 - 1  # advanced by Q0 + k - 1, once


def test_kv_layers_without_per_row_slots_fall_back(target, draft_dir):
    """A KV plugin's layers that take one slot index for all rows: batch 1 still runs on the runtime, a batch of 3
    runs the eager cache (one warning), both exact."""

    class SharedSlotLayer(StaticKVLayer):
        per_row_slots = False

    def factory(layer_idx, batch, capacity, kv_heads, head_dim, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        return SharedSlotLayer(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    model = copy.deepcopy(target)
    hf_accel.apply(model, spec_for("draft", draft_dir))
    model._hf_accel_kv_layer = factory
    try:
        ids, mask = prompts(1, seed=5)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(**kw), target.generate(**kw)) and model.hf_accel_spec_stats["runtime"]
        ids, mask = prompts(3, seed=5)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        with pytest.warns(UserWarning, match="per_row_slots"):
            out = model.generate(**kw)
        assert torch.equal(out, target.generate(**kw)) and not model.hf_accel_spec_stats["runtime"]
    finally:
        del model._hf_accel_kv_layer
        hf_accel.remove(model)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_greedy_identical_with_cuda_graphs(compile, tmp_path):
    """fp32, CUDA graphs on (SDPA decode attention, as test_runtime's exactness test: random weights' near-ties)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build("llama").cuda()
    smaller_perturbed_copy(model.cpu(), layers=1, noise=0.3).save_pretrained(tmp_path / "draft")
    model.cuda()
    fast = f"fast(compile={compile}, decode_attention=sdpa)"
    runs = gpu_references(model)
    for method in ("draft", "lookup", "recycle"):
        assert_on_graphs_like_target(model, spec_for(method, tmp_path / "draft", fast), runs, method)


def gpu_references(model) -> list:
    """(batch, generate kwargs, the target's own greedy output) at batch 1 and a left-padded batch of 3, on CUDA."""
    runs = []
    for batch in (1, 3):
        ids, mask = prompts(batch, seed=batch)
        kw = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=20, do_sample=False)
        runs.append((batch, kw, model.generate(**kw)))
    return runs


def assert_on_graphs_like_target(model, spec: str, runs: list, label: str) -> None:
    """`spec` gives the target's tokens for every run, on the runtime (no fallback) with captured graphs."""
    hf_accel.apply(model, spec)
    try:
        for batch, kw, ref in runs:
            with warnings.catch_warnings():
                # a fallback warns as hf_accel; others (inductor's TF32 note, as TF32 is off here) may pass
                warnings.filterwarnings("error", message=".*hf_accel.*")
                out = model.generate(**kw)
            assert torch.equal(out, ref), f"{label} batch {batch}"
            assert model.hf_accel_spec_stats["runtime"] and get_runtime(model).stats["captures"] >= 1
    finally:
        hf_accel.remove(model)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_medusa_greedy_identical_with_cuda_graphs(compile, tmp_path):
    """`fast+medusa` on CUDA graphs (tree verify and move captured; compiled or not), fp32: the target's tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build("llama")
    heads = random_heads(model, tmp_path / "h")
    model.cuda()
    fast = f"fast(compile={compile}, decode_attention=sdpa)"
    runs = gpu_references(model)
    for tree in ("default", "3,2,1"):
        assert_on_graphs_like_target(model, medusa_spec(heads, tree, fast), runs, f"medusa tree {tree}")


def eager_ops_per_round(model, spec, ids, mask) -> float:
    """scripts/spec_round_ops.py's count: eager aten ops outside the session forwards, per round (prefill cancels)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "spec_round_ops.py"
    module = importlib.util.spec_from_file_location("spec_round_ops", path)
    ops = importlib.util.module_from_spec(module)
    module.loader.exec_module(ops)
    hf_accel.apply(model, spec)
    try:
        counts = []
        for new in (6, 30):
            kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
            model.generate(**kw)  # sessions and buffers
            with ops.counting() as c:
                model.generate(**kw)
            counts.append((c.ops, model.hf_accel_spec_stats["rounds"]))
    finally:
        hf_accel.remove(model)
    (o0, r0), (o1, r1) = counts
    return (o1 - o0) / (r1 - r0)


@pytest.mark.parametrize("batch, most", [(1, 13), (3, 36)])
def test_greedy_round_glue_stays_small(target, draft_dir, batch, most):
    """A greedy round on the fast runtime (draft chain, verify) keeps its eager glue small: on the GPU every op is a
    launch plus Python next to a ~0.6 ms target step (75 ops per round at batch 1 before the glue was cut; now 13,
    and about 33 for this ragged batch of 3, whose rows rewind by per-row counts)."""
    ids, mask = prompts(batch, seed=1, lengths=[3, 11, 7][:batch] if batch > 1 else None)
    per_round = eager_ops_per_round(target, f"fast+draft(draft='{draft_dir}', k=3)", ids, mask)
    print(f"batch {batch}: {per_round:.1f} eager ops per round")
    assert per_round <= most
