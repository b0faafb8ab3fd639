"""duo (head-wise retrieval/streaming storage, calibration saved in the artifact) and quest (query-aware page
selection over a full cache), plus the paged decode-attention kernel under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import build, sample_ids

import hf_accel
from hf_accel.errors import AccelError, OptionError
from hf_accel.plugins.kv_cache import KVCache, calibrate_duo


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


EXACT = {  # specs that must equal the full cache: all heads retrieval / streaming window covers everything /
    "duo-all-retrieval": "duo(heads='11.11')",  # budget above the context
    "duo-window-covers": "duo(heads='00.00', sinks=4, window=200)",
    "duo-mixed-covers": "duo(heads='10.01', sinks=4, window=200)",
    "quest-generous": "quest(budget=512, page=16)",
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_generous_settings_equal_full_cache(arch):
    model = build(arch)
    ids = sample_ids(2, 40)
    ref = greedy(model, ids)
    for name, spec in EXACT.items():
        hf_accel.apply(model, spec)
        out = greedy(model, ids)
        assert isinstance(out.past_key_values, KVCache), name
        assert torch.equal(out.sequences, ref.sequences), name
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4, name
        hf_accel.remove(model)


def test_duo_streaming_heads_store_only_sinks_and_window():
    model = build("llama")
    hf_accel.apply(model, "duo(heads='10.01', sinks=2, window=8, slack=0)")
    out = greedy(model, sample_ids(2, 50), new=6)
    cache = out.past_key_values
    seen = cache.get_seq_length()
    for layer in cache.layers:
        assert layer.buf.n == seen and layer.buf.k.shape[1] == 1  # one retrieval head, every slot
        assert layer.sk.shape[1] == 1 and layer.sk.shape[2] == 10  # one streaming head: 2 sinks + 8 recent
        assert layer.spos[0].tolist() == [0, 1] + list(range(seen - 8, seen))
    # memory really is per head: about half of the same cache with both heads retrieval
    hf_accel.remove(model)
    hf_accel.apply(model, "duo(heads='11.11')")
    full = greedy(model, sample_ids(2, 50), new=6).past_key_values.nbytes()
    assert cache.nbytes() < 0.55 * full


def test_duo_small_window_changes_output_and_mixed_is_between():
    model = build("llama")
    ids = sample_ids(2, 60)
    ref = torch.stack(greedy(model, ids).logits)
    errs = {}
    for spec in ("duo(heads='00.00', sinks=2, window=4, slack=0)", "duo(heads='10.01', sinks=2, window=4, slack=0)"):
        hf_accel.apply(model, spec)
        errs[spec] = (torch.stack(greedy(model, ids).logits) - ref).abs().mean().item()
        hf_accel.remove(model)
    a, b = errs.values()
    assert a > b > 0


@pytest.mark.parametrize("spec", ["duo(heads='10.01', sinks=4, window=200)", "duo(heads='01.10', sinks=2, window=6, slack=0)",
                                  "quest(budget=512, page=16)", "quest(budget=32, page=16)"])
def test_left_padding_matches_single_rows(spec):
    model = build("llama")
    lengths = [40, 31, 19]
    ids, mask = left_padded(lengths)
    hf_accel.apply(model, spec)
    batch = greedy(model, ids, mask)
    for i, n in enumerate(lengths):
        # unpadded single rows must give the same tokens (quest's pages start at each row's first real token)
        single = greedy(model, ids[i:i + 1, -n:])
        assert torch.equal(batch.sequences[i, -single.sequences.shape[1]:], single.sequences[0])
        diff = max((a[i] - b[0]).abs().max().item() for a, b in zip(batch.logits, single.logits))
        assert diff < 1e-4, (i, diff)


def test_duo_padding_is_never_a_sink():
    model = build("llama")
    ids, mask = left_padded([40, 12])
    hf_accel.apply(model, "duo(heads='00.00', sinks=2, window=5, slack=0)")
    cache = greedy(model, ids, mask, new=4).past_key_values
    seen = cache.get_seq_length()
    for layer in cache.layers:
        assert layer.spos[1].tolist() == [28, 29] + list(range(seen - 5, seen))  # row 1's real tokens start at 28


def test_quest_reads_selected_pages_and_summaries_bound_keys():
    model = build("llama")
    hf_accel.apply(model, "quest(budget=32, page=16)")
    out = greedy(model, sample_ids(2, 100), new=5)
    cache = out.past_key_values
    for layer in cache.layers:
        assert layer.selections == 4  # every decode step after the prompt read a selection
        n = layer.buf.n
        k = layer.buf.k[:, :, :n]
        pages = n // 16
        full = k[:, :, : pages * 16].reshape(2, 2, pages, 16, -1)
        assert torch.equal(layer.kmin[:, :, :pages], full.amin(3)) and torch.equal(layer.kmax[:, :, :pages], full.amax(3))
        q = torch.randn(2, 4, 1, 16)
        sel = layer.select_pages(q)
        assert sel.shape[-1] == 2 and (sel[..., 0] == 0).all() and (sel[..., -1] == (n - 1) // 16).all()


def test_quest_selection_is_the_upper_bound_topk():
    """The selected middle pages are those with the highest Quest bound: plant one page whose keys align with q."""
    from hf_accel.plugins.kv_cache import QuestPolicy

    cache = KVCache(1, QuestPolicy(budget=48, page=16))
    layer = cache.layers[0]
    torch.manual_seed(0)
    k = torch.randn(1, 1, 128, 8) * 0.1
    q = torch.ones(1, 2, 1, 8)
    k[0, 0, 70] = 5.0  # page 4
    layer.update(k, k.clone())
    assert layer.select_pages(q)[0, 0].tolist() == [0, 4, 7]


def test_quest_budget_trades_quality():
    model = build("qwen2")
    ids = sample_ids(2, 120)
    ref = torch.stack(greedy(model, ids).logits)
    errs = []
    for budget in (96, 32):
        hf_accel.apply(model, f"quest(budget={budget}, page=16)")
        errs.append((torch.stack(greedy(model, ids).logits) - ref).abs().mean().item())
        hf_accel.remove(model)
    assert errs[0] < errs[1]


@pytest.mark.parametrize("spec", ["duo(heads='10.01', sinks=2, window=8)", "quest(budget=32, page=16)"])
def test_multi_turn(spec):
    model = build("llama")
    hf_accel.apply(model, spec)
    first = greedy(model, sample_ids(1, 40), new=5)
    turn2 = torch.cat([first.sequences, sample_ids(1, 30, seed=5)], dim=1)
    second = greedy(model, turn2, past_key_values=first.past_key_values, new=5)
    assert second.past_key_values is first.past_key_values
    assert second.past_key_values.get_seq_length() == turn2.shape[1] + 4
    assert all(torch.isfinite(s).all() for s in second.logits)


def test_duo_calibration_picks_copying_heads_and_is_saved(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("qwen2")
    hf_accel.apply(model, "duo(ratio=0.5, sinks=2, window=8)")
    greedy(model, sample_ids(1, 30), new=2)  # first generate calibrates (synthetic data)
    heads = hf_accel.get_config(model).plugins[0].heads
    assert len(heads) == 5 and heads.count("1") == 2
    ids = sample_ids(1, 64, seed=3)
    again = calibrate_duo(model, ids, ratio=0.25)  # explicit calibration updates the applied plugin
    assert again.count("1") == 1 and hf_accel.get_config(model).plugins[0].heads == again
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert hf_accel.get_config(loaded).plugins[0].heads == again
    x = sample_ids(1, 40)
    assert torch.equal(greedy(loaded, x).sequences, greedy(model, x).sequences)


def test_duo_calibration_ranks_by_streaming_error():
    """Heads whose values are constant lose nothing to the streaming pattern; the one head that does is chosen."""
    model = build("llama")
    ids = torch.cat([sample_ids(1, 48), sample_ids(1, 48)], dim=1)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            w = layer.self_attn.v_proj.weight
            w[: 16 if i == 1 else 32] = 0.0  # only KV head 1 of layer 1 has non-zero values
    assert calibrate_duo(model, ids, ratio=0.25, sinks=2, window=4) == "00.01"
    assert calibrate_duo(model, ids, ratio=0.0, sinks=2, window=4) == "00.00"


def test_bad_options():
    with pytest.raises(OptionError, match="groups"):
        hf_accel.apply(build("llama"), "duo(heads='1.1')")
    with pytest.raises(OptionError, match="'0'/'1'"):
        hf_accel.apply(build("llama"), "duo(heads='12.11')")
    with pytest.raises(OptionError, match="budget"):
        hf_accel.apply(build("llama"), "quest(budget=16, page=16)")
    with pytest.raises(AccelError, match="cannot be combined"):
        hf_accel.apply(build("llama"), "quest+h2o")
    with pytest.raises(AccelError, match="cannot be combined"):
        hf_accel.apply(build("llama"), "duo(heads='11.11')+kvquant")
    model = build("llama")
    hf_accel.apply(model, "quest(budget=32)")
    hf_accel.remove(model)
    assert "generate" not in model.__dict__


KERNEL_TEST = r"""
import torch
from hf_accel.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
torch.manual_seed(0)
for (B, H, G, D, C, page) in [(2, 2, 4, 32, 96, 16), (2, 1, 2, 16, 128, 32)]:
    q, k, v = torch.randn(B, H, G, D), torch.randn(B, H, C, D), torch.randn(B, H, C, D)
    P = C // page
    pt = torch.stack([torch.randperm(P)[:P - 1] for _ in range(B * H)]).view(B, H, P - 1).int()
    pt[0, 0, 1] = -1  # no page
    nv = torch.tensor([C - 5] + [C - 30] * (B - 1))
    real = torch.ones(B, C, dtype=torch.bool)
    real[-1, :20] = False  # left padding of the last row
    ref = paged_decode_attention_ref(q, k, v, pt, nv, real, 0.2, page)
    for splits in (1, 2):
        out = paged_decode_attention(q, k, v, pt, nv, real, 0.2, page, splits=splits)
        assert (out - ref).abs().max() < 1e-4, (splits, (out - ref).abs().max())
    out = paged_decode_attention(q, k, v, pt, nv, None, 0.2, page)
    assert (out - paged_decode_attention_ref(q, k, v, pt, nv, None, 0.2, page)).abs().max() < 1e-4
# all slots of a (row, head) masked: zeros, not NaN
pt = torch.zeros(1, 1, 1, dtype=torch.int32)
out = paged_decode_attention(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), pt,
                             torch.tensor([0]), None, 0.2, 16)
assert torch.equal(out, torch.zeros_like(out))
print("ok")
"""


QUEST_KERNEL_PATH = r"""
import sys; sys.path.insert(0, 'tests')
import hf_accel
from conftest import build, sample_ids
model = build('llama'); ids = sample_ids(2, 70)
outs = []
for kernel in ('torch', 'triton'):
    hf_accel.apply(model, f"quest(budget=32, page=16, kernel='{kernel}')")
    outs.append(torch.stack(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True).logits))
    hf_accel.remove(model)
assert (outs[0] - outs[1]).abs().max() < 1e-4, (outs[0] - outs[1]).abs().max()
print("ok quest")
"""


def test_paged_decode_kernel_interpreter():
    """One child process (TRITON_INTERPRET must be set before triton is imported): the kernel against its reference
    (selected pages, a missing page, rows of different lengths, left padding, 1-3 splits), then quest's kernel path
    against its torch path inside generate()."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", KERNEL_TEST + QUEST_KERNEL_PATH], env=env, capture_output=True,
                         text=True, timeout=600, cwd=root)
    assert res.returncode == 0 and "ok quest" in res.stdout, res.stderr[-2000:]


@pytest.mark.gpu
def test_paged_decode_kernel_cuda_graph():
    from hf_accel.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref

    torch.manual_seed(0)
    B, H, G, D, C, page = 4, 8, 4, 128, 8192, 16
    dev = "cuda"
    q, k, v = (torch.randn(B, H, G, D, device=dev, dtype=torch.bfloat16),
               torch.randn(B, H, C, D, device=dev, dtype=torch.bfloat16),
               torch.randn(B, H, C, D, device=dev, dtype=torch.bfloat16))
    pt = torch.stack([torch.randperm(C // page, device=dev)[:128].sort().values for _ in range(B * H)]).view(B, H, 128).int()
    nv = torch.tensor([C, C - 100, C - 4000, 17], device=dev)
    real = torch.ones(B, C, dtype=torch.bool, device=dev)
    real[2, :300] = False
    ref = paged_decode_attention_ref(q, k, v, pt, nv, real, D ** -0.5, page)
    out = paged_decode_attention(q, k, v, pt, nv, real, D ** -0.5, page)
    assert (out.float() - ref.float()).abs().max() < 2e-2
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        paged_decode_attention(q, k, v, pt, nv, real, D ** -0.5, page)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        g_out = paged_decode_attention(q, k, v, pt, nv, real, D ** -0.5, page)
    q.copy_(torch.randn_like(q))
    graph.replay()
    ref = paged_decode_attention_ref(q, k, v, pt, nv, real, D ** -0.5, page)
    assert (g_out.float() - ref.float()).abs().max() < 2e-2


def test_quality_script_on_tiny(tmp_path):
    """scripts/quality_kv.py on the committed tiny reference: records, summary, and a damaged setting (sink at 1/16 of
    the context) measurably worse than the full cache."""
    import importlib.util
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("quality_kv", os.path.join(root, "scripts", "quality_kv.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "q.json"
    mod.main(["--model", os.path.join(root, "hf_accel", "quality", "assets", "tiny"), "--out", str(out), "--device",
              "cpu", "--smoke", "--plugins", "sink,quest", "--fractions", "1/16,1/2", "--no-quant"])
    data = json.loads(out.read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert set(rows) == {"full", "sink 1/16", "sink 1/2", "quest 1/2"} and not data["summary"]["errors"]
    assert rows["sink 1/16"]["decode_ppl_rel_change_vs_full"] > 0.03  # 16 of 256 tokens: clearly worse
    assert abs(rows["quest 1/2"]["decode_ppl_rel_change_vs_full"]) < abs(rows["sink 1/16"]["decode_ppl_rel_change_vs_full"])
    assert rows["sink 1/16"]["kv_bytes_ratio_vs_full"] < 0.15
    assert data["summary"]["sink_1of16_decode_ppl_rel_change_vs_full"] == round(rows["sink 1/16"]["decode_ppl_rel_change_vs_full"], 5)
    assert any(r["metric"] == "needle_recall" for r in data["records"])


@pytest.mark.parametrize("spec", ["quest(budget=32)", "duo(heads='10.01', sinks=2, window=8)"])
def test_fast_runtime_composes_by_falling_back(spec):
    """fast + a KV plugin: the KV plugin's cache is passed to generate, which the fast runtime hands to transformers'
    own loop (with a warning): same tokens as the KV plugin alone."""
    model = build("llama")
    ids = sample_ids(2, 60)
    hf_accel.apply(model, spec)
    alone = greedy(model, ids).sequences
    hf_accel.remove(model)
    hf_accel.apply(model, "fast+" + spec)
    with pytest.warns(UserWarning, match="fast"):
        both = greedy(model, ids)
    assert isinstance(both.past_key_values, KVCache) and torch.equal(both.sequences, alone)
