"""The KV eviction policies keep the same tokens however much left padding a batch has.

Extra all-padding columns in front of a left-padded batch (the speculative decoding loop's batch layout has one)
shift every real token's position by the same amount and must not change what a row keeps, so not its tokens.
They did: SnapKV's max pooling makes exact ties between neighbouring slots by construction, and `topk` broke them
by storage index (row 0 of the batch below kept position 31 instead of 29 with one more column), and avg pooling
counted padding slots into a row's first windows. Every selection now orders by score, then by position
(`_layers.rank_key`): eager (`KVLayer.evict`, adakv's allocation, duo's streaming heads), the fast runtime's
prefill (`_fast_evict.keep_indices`) and h2o's decode eviction inside the captured step.

quest (it selects pages, it evicts nothing) had pages that were fixed runs of storage slots, so a padding column
moved a row's page boundaries; a row's pages now start at its first real token (eager only: fast+quest runs
transformers' loop).

Not covered: `slack` schedules when padding survives the prefill (a cache evicts when it stores more than
budget + slack slots, padding included): the calls below are longer than budget + slack, or use slack=0.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.plugins.kv_cache._fast_evict import EMPTY, keep_indices
from hf_accel.plugins.kv_cache._generate import pool_votes
from hf_accel.plugins.kv_cache._layers import rank_key, top_slots
from hf_accel.plugins.kv_cache.snapkv import SnapKVPolicy

pytestmark = pytest.mark.usefixtures("one_thread")

SNAP = "snapkv(budget=32, window=8, kernel=3)"
# name: (spec, served by `fast`)
POLICIES = {
    "sink": ("sink(window=16, sinks=4)", True),
    "h2o": ("h2o(budget=32)", True),
    "snapkv": (SNAP, True),
    "snapkv_avg": ("snapkv(budget=32, window=8, kernel=3, pooling='avg')", True),
    "adakv": ("adakv(budget=32, window=8, kernel=3)", True),
    "adakv_avg": ("adakv(budget=32, window=8, kernel=3, pooling='avg', floor=0.0)", True),
    "duo": ("duo(ratio=0.25, sinks=4, window=16, slack=4)", False),
    "quest": ("quest(budget=32, page=16)", False),  # fast+quest runs transformers' loop (a warning): eager only
    "quest_page8": ("quest(budget=32, page=8)", False),
}
# slack=0: rows shorter than the budget keep padding after the prefill, and evict it first while decoding
NO_SLACK = {
    "sink": ("sink(window=16, sinks=4, slack=0)", True),
    "h2o": ("h2o(budget=32, recent=8, slack=0)", True),
    "snapkv": ("snapkv(budget=32, window=8, kernel=3, slack=0)", True),
    "snapkv_avg": ("snapkv(budget=32, window=8, kernel=3, pooling='avg', slack=0)", True),
    "adakv": ("adakv(budget=32, window=8, kernel=3)", True),
    "duo": ("duo(ratio=0.25, sinks=4, window=16, slack=0)", False),
    # quest has no slack; rows of at most `budget` tokens read all their pages, also when the batch is longer
    "quest": ("quest(budget=32, page=16)", False),
    "quest_odd_budget": ("quest(budget=40, page=16)", False),  # not a whole number of pages
}


@pytest.fixture(scope="module")
def tiny():
    from hf_accel.quality.reference import reference_path

    try:
        return AutoModelForCausalLM.from_pretrained(reference_path("tiny"), dtype=torch.float32).eval()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"tiny reference model not built: {e}")


def batch(lengths, seed: int):
    """Left-padded random prompts (ids in [3, 4000), pad id 0), as tests/test_speculative_kv.py's `prompts`."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = torch.randint(3, 4000, (n,), generator=g)
        mask[b, t - n:] = 1
    return ids, mask


def reported_batch():
    """The failing call of the report: tests/test_speculative_kv.py's `prompts(3, seed=3)` (70..100 tokens)."""
    g = torch.Generator().manual_seed(3)
    lengths = [int(x) for x in torch.randint(70, 101, (3,), generator=g)]
    t = max(lengths)
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = torch.randint(3, 4000, (n,), generator=g)
        mask[b, t - n:] = 1
    return ids, mask


def pad_left(ids, mask, extra: int):
    return (torch.cat([ids.new_zeros(ids.shape[0], extra), ids], 1),
            torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1))


def greedy(model, ids, mask, new: int):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `fast`: no fallback to transformers' loop
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    return out[:, ids.shape[1]:]


def assert_padding_invariant(tiny, spec: str, fast: bool, calls):
    modes = [spec] + ([f"fast+{spec}"] if fast else [])
    plain = greedy(tiny, *calls[0], 24)
    changed = 0
    for mode in modes:
        model = copy.deepcopy(tiny)
        hf_accel.apply(model, mode)
        for ids, mask in calls:
            want = greedy(model, ids, mask, 24)
            for extra in (1, 2):
                got = greedy(model, *pad_left(ids, mask, extra), 24)
                assert torch.equal(got, want), (mode, extra, (got != want).sum().item())
        changed += int((greedy(model, *calls[0], 24) != plain).sum())
    assert changed, f"{spec} does not change these tokens: the check would not see it"


@pytest.mark.parametrize("name", list(POLICIES))
def test_extra_left_padding_changes_nothing(tiny, name):
    """Prompts of 70..100 tokens, longer than budget + slack (every row evicts at the prefill), batch 3 and 1."""
    spec, fast = POLICIES[name]
    ids, mask = reported_batch()
    assert_padding_invariant(tiny, spec, fast, [(ids, mask), (ids[1:2, -80:], mask[1:2, -80:]), batch([90, 77], 5)])


@pytest.mark.parametrize("name", list(NO_SLACK))
def test_extra_left_padding_changes_nothing_when_rows_keep_padding(tiny, name):
    """slack=0 and rows shorter than the budget (they keep padding after the prefill), or all rows shorter."""
    spec, fast = NO_SLACK[name]
    assert_padding_invariant(tiny, spec, fast, [batch([70, 20, 45], 7), batch([30, 12], 8)])


# -- the order itself --------------------------------------------------------------------------------------------

def test_rank_key_orders_by_score_then_earlier_position():
    scores = torch.tensor([-math.inf, -1e30, -2.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 2.0, 1e30, math.inf])
    key = rank_key(scores, torch.zeros(len(scores), dtype=torch.long))
    assert torch.equal(key.argsort(), torch.arange(len(scores)))
    assert rank_key(torch.tensor([-0.0]), torch.tensor([3])) == rank_key(torch.tensor([0.0]), torch.tensor([3]))
    # a plateau of equal scores: the earlier positions win, whatever the storage order and the position offset
    score = torch.tensor([[1.0, 3, 3, 3, 2, 3]])
    for shift in (0, 1, 7):
        pos = torch.tensor([[0, 1, 2, 3, 4, 5]]) + shift
        assert top_slots(score, pos, 2).tolist() == [[1, 2]]
        perm = torch.tensor([5, 3, 0, 4, 1, 2])
        picked = top_slots(score[:, perm], pos[:, perm], 3)
        assert sorted(pos[:, perm].gather(1, picked)[0].tolist()) == [1 + shift, 2 + shift, 3 + shift]
    # padding (-1) and h2o+fast's free slots (EMPTY) are distinct from real positions
    pos = torch.tensor([-1, EMPTY, 0, 1])
    assert len(set(rank_key(torch.zeros(4), pos).tolist())) == 4


def test_keep_indices_shifted_by_padding_keeps_the_same_tokens():
    """snapkv's selection on pooled votes with many ties (max pooling), with 0..3 extra padding slots in front."""
    policy = SnapKVPolicy(budget=12, window=3, kernel=3)
    g = torch.Generator().manual_seed(0)
    votes = torch.randint(0, 4, (2, 2, 30), generator=g).float()  # few distinct values: plateaus everywhere
    kept = None
    for extra in range(4):

        class Stand:
            pos = torch.cat([torch.full((2, 2, extra), -1), torch.arange(30).expand(2, 2, 30) + extra], -1).int()
            seen = 30 + extra
            scratch = pool_votes(torch.cat([votes.new_zeros(2, 2, extra), votes], -1), pos >= 0, 3, "max")

        idx = keep_indices(policy, Stand, Stand.pos, policy.budget)
        got = Stand.pos.gather(-1, idx) - extra
        assert kept is None or torch.equal(got, kept), extra
        kept = got


def test_h2o_decode_victims_are_the_complement_of_kvlayer_keep():
    """h2o+fast frees the lowest slots by `rank_key` over storage in any order; KVLayer keeps the top `budget` in
    position order: the same sets, ties included."""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        n, evicted = 40, 9
        score = torch.randint(0, 3, (n,), generator=g).float()
        pos = torch.arange(n)
        keep = set(pos[top_slots(score, pos, n - evicted)].tolist())
        perm = torch.randperm(n, generator=g)
        victims = rank_key(score[perm], pos[perm]).topk(evicted, largest=False).indices
        assert set(pos[perm][victims].tolist()) == set(range(n)) - keep


def test_avg_pooling_ignores_padding():
    votes = torch.tensor([[0.0, 0.0, 3.0, 1.0, 2.0]])
    real = votes.new_tensor([[0, 0, 1, 1, 1]]).bool()
    got = pool_votes(votes, real, 3, "avg")
    assert got[0, 2:].tolist() == [2.0, 2.0, 1.5]  # the first real slot: (3 + 1) / 2, not (0 + 3 + 1) / 3
    alone = pool_votes(votes[:, 2:], real[:, 2:], 3, "avg")
    assert torch.equal(alone, got[:, 2:])


# -- quest: pages start at each row's first real token ---------------------------------------------------------

@pytest.mark.parametrize("spec", ["quest(budget=32, page=16)", "quest(budget=40, page=16)", "quest(budget=32, page=8)"])
def test_quest_rows_equal_rows_alone(tiny, spec):
    """Each row of a left-padded batch (rows longer and shorter than the budget) gives its tokens alone, unpadded."""
    model = copy.deepcopy(tiny)
    hf_accel.apply(model, spec)
    lengths = [90, 77, 38, 20]  # 38: at most budget=40 tokens but 3 pages
    ids, mask = batch(lengths, 9)
    out = greedy(model, ids, mask, 24)
    for i, n in enumerate(lengths):
        assert torch.equal(out[i], greedy(model, ids[i:i + 1, -n:], mask[i:i + 1, -n:], 24)[0]), i


def test_quest_pages_start_at_the_first_real_token():
    """Summaries and selection of a row behind 0..19 padding slots are those of the row alone."""
    from hf_accel.plugins.kv_cache import KVCache, QuestPolicy
    from hf_accel.plugins.kv_cache._layers import SELF_ATTEND

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 70, 8, generator=g)
    query = torch.randn(1, 4, 1, 8, generator=g)
    step = torch.randn(1, 2, 1, 8, generator=g)
    want = None
    for pad in range(20):
        cache = KVCache(1, QuestPolicy(budget=32, page=16))
        cache.set_attention_mask(torch.cat([torch.zeros(1, pad), torch.ones(1, 70)], 1))
        layer = cache.layers[0]
        layer.update(torch.cat([keys.new_zeros(1, 2, pad, 8), keys], 2), torch.zeros(1, 2, 70 + pad, 8))
        layer.update(step, step)  # a decode step: slot 70 + pad, the row's 71st token
        SELF_ATTEND.set(None)  # no attention call takes the step: the next model's first one must not
        got = (layer.kmin[:, :, :5], layer.kmax[:, :, :5], layer.select_pages(query))
        if want is None:
            full = torch.cat([keys, step], 2)[:, :, :64].reshape(1, 2, 4, 16, 8)
            assert torch.equal(got[0][:, :, :4], full.amin(3)) and torch.equal(got[1][:, :, :4], full.amax(3))
            want = got
        assert all(torch.equal(a, b) for a, b in zip(got, want)), pad


QUEST_KERNEL_PADDED = r"""
import sys; sys.path.insert(0, 'tests')
import torch, hf_accel
from hf_accel.kernels import decode_attention
from test_kv_padding import batch
from conftest import build
calls = []
kernel = decode_attention.paged_decode_attention
decode_attention.paged_decode_attention = lambda *a, **k: calls.append(1) or kernel(*a, **k)
model = build('llama')
for lengths in ([70, 38], [70, 45]):  # padding 0 and 32 (whole pages: the kernel), 0 and 25 (the gather path)
    ids, mask = batch(lengths, 3)
    ids = torch.where(mask.bool(), ids % (model.config.vocab_size - 3) + 3, 0)
    outs = []
    for k in ('torch', 'triton'):
        hf_accel.apply(model, f"quest(budget=32, page=16, kernel='{k}')")
        outs.append(torch.stack(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True, output_logits=True).logits))
        hf_accel.remove(model)
    assert (outs[0] - outs[1]).abs().max() < 1e-4, (lengths, (outs[0] - outs[1]).abs().max())
    print(lengths, len(calls))
    assert bool(calls) == (lengths[1] == 38), (lengths, len(calls))
    calls.clear()
print("ok")
"""


def test_quest_kernel_path_with_left_padding():
    """Under TRITON_INTERPRET=1: rows padded by whole pages read their pages through the kernel (page indices moved
    to storage pages), other padding takes the gather path; both equal kernel='torch'."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", QUEST_KERNEL_PADDED], env=env, capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
