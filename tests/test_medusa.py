"""Medusa heads (issue 7): training with the base frozen, the heads artifact, tree verification.

Greedy output is compared token for token with the target's own `generate()` (fp32 CPU) at batch 1 and on left-padded
batches with rows of different lengths, EOS in some rows and ragged acceptance; sampled output is compared with the
target's exact distribution of the first three tokens (6-token vocabulary, chi-square and total variation), and the
same test is shown to reject two wrong acceptance rules.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import VOCAB, build
from test_speculative import chi_square_p, prompts, small_vocab_model, total_variation
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import hf_accel
from hf_accel.errors import AccelError, ArtifactError, OptionError
from hf_accel.plugins.speculative import decode
from hf_accel.plugins.speculative.medusa import (MedusaHeads, build_tree, load_heads, parse_tree, save_heads,
                                                 train_medusa)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture
def acceptance_log(monkeypatch):
    """Records each verify round's per-row accepted depths (list of lists)."""
    log = []
    right = decode.verify_tree

    def spy(*args):
        out = right(*args)
        log.append(out[1].tolist())
        return out

    monkeypatch.setattr(decode, "verify_tree", spy)
    return log


def ragged(log) -> bool:
    """Some round in which rows kept different, non-zero numbers of drafts."""
    return any(len({a for a in acc}) > 1 and max(acc) > 0 for acc in log)


def medusa_generate(model, spec, **kw):
    hf_accel.apply(model, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a silent fallback to transformers' loop fails the test
            out = model.generate(**kw)
        return out, dict(model.hf_accel_spec_stats)
    finally:
        hf_accel.remove(model)


@pytest.fixture(scope="module")
def tiny():
    from hf_accel.quality.reference import load_reference

    try:
        return load_reference("tiny")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"tiny reference model not built: {e}")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    model, tok = tiny
    torch.manual_seed(0)
    heads, losses = train_medusa(model, tok, heads=3, steps=40, seq_len=48, batch=8, lr=3e-3)
    path = tmp_path_factory.mktemp("medusa") / "heads"
    save_heads(heads, path, base_model="tiny", training={"steps": 40})
    return heads, losses, path


def _texts():
    return ["import os\nimport sys\n\ndef main(", "class Foo:\n    def __init__(self", "for i in range(", "# ",
            "def f(x):\n    return ", "    if not ", "from collections import ", "try:\n    import ",
            "raise ValueError(", "    def __repr__(self):\n        return ", "with open(", "self.assertEqual(",
            "__all__ = [", "    for key, value in ", "#!/usr/bin/env python", "return self._", "elif ",
            "    except ", "print(", "x = [i for i in "]


GREEDY = dict(max_new_tokens=24, do_sample=False)


@pytest.fixture(scope="module")
def tiny_greedy(tiny, trained):
    """The target's own greedy output (GREEDY) on each of _texts() alone and on left-padded batches of five:
    the references of the greedy tests on tiny, computed once (after training, on the model the tests use)."""
    model, tok = tiny
    texts = _texts()
    singles = [model.generate(**tok([t], return_tensors="pt"), **GREEDY) for t in texts]
    tok.padding_side = "left"
    batches = []
    for i in range(0, len(texts), 5):
        enc = tok(texts[i: i + 5], return_tensors="pt", padding=True)
        batches.append((enc, model.generate(**enc, **GREEDY)))
    return singles, batches


def test_heads_train_loss_decreases(trained):
    _, losses, _ = trained
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_artifact_round_trip(trained):
    heads, _, path = trained
    assert {p.name for p in path.iterdir()} >= {"medusa_config.json", "medusa_heads.safetensors", "README.md"}
    config = json.loads((path / "medusa_config.json").read_text())
    assert config["num_heads"] == 3 and config["base_model"] == "tiny"
    assert "medusa" in (path / "README.md").read_text()
    loaded, _ = load_heads(str(path))
    saved, back = heads.state_dict(), loaded.state_dict()
    assert list(saved) == list(back)  # zip alone would pass with tensors missing on either side
    assert all(torch.equal(saved[k].cpu(), back[k]) for k in saved)


def test_greedy_identical_on_tiny_and_accepts(tiny, trained, tiny_greedy):
    model, tok = tiny
    _, _, path = trained
    kw = GREEDY
    encs = [tok([t], return_tensors="pt") for t in _texts()]
    refs, _ = tiny_greedy
    hf_accel.apply(model, f"medusa(heads='{path}')")
    try:
        steps = accepted = 0
        for e, ref in zip(encs, refs):
            out = model.generate(**e, **kw)
            assert torch.equal(out, ref)
            stats = model.hf_accel_spec_stats
            assert "fallback" not in stats and stats["batch"] == 1
            steps, accepted = steps + stats["row_rounds"], accepted + stats["accepted"]
        assert (accepted + steps) / steps > 1.3  # mean accepted length (tokens per verify step) > 1
        assert accepted / steps > 0.25  # 40 training steps on CPU give ~0.47
    finally:
        hf_accel.remove(model)
    assert "generate" not in vars(model) or not hasattr(model, "hf_accel_spec_stats")


@pytest.mark.parametrize("tree", ["default", "3,2,1"])
def test_greedy_batched_on_tiny(tiny, trained, tree, acceptance_log, tiny_greedy):
    """Left-padded batches of the 20 prompts: identical to the target's batched generate and, row by row, to the
    target alone on the unpadded prompt; rows accept different path lengths in the same round."""
    model, tok = tiny
    _, _, path = trained
    tok.padding_side = "left"
    kw = GREEDY
    singles = [single[0] for single in tiny_greedy[0]]
    accepted = rounds = 0
    for i, (enc, ref) in zip(range(0, len(singles), 5), tiny_greedy[1]):
        assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths
        out, stats = medusa_generate(model, f"medusa(heads='{path}', tree='{tree}')", **enc, **kw)
        assert torch.equal(out, ref)
        assert stats["batch"] == 5 and not stats["sampling"]
        for row, mask, single in zip(out, enc["attention_mask"], singles[i: i + 5]):
            real = torch.cat([row[: mask.shape[0]][mask.bool()], row[mask.shape[0]:]])
            assert torch.equal(real[: single.shape[0]], single)
        accepted, rounds = accepted + stats["accepted"], rounds + stats["row_rounds"]
    assert accepted / rounds > 0.25
    assert ragged(acceptance_log)


def test_eos_and_max_new_tokens_per_row_tiny(tiny, trained):
    model, tok = tiny
    _, _, path = trained
    tok.padding_side = "left"
    enc = tok(_texts()[:6], return_tensors="pt", padding=True)
    t = enc["input_ids"].shape[1]
    free = model.generate(**enc, max_new_tokens=24, do_sample=False)[:, t:]
    counts = torch.bincount(free.flatten())
    counts[0] = 0
    eos = int(counts.argmax())  # the most frequent new token: rows reach it at different steps (or never)
    stops = [(row == eos).nonzero()[:1].tolist() for row in free]
    assert len({str(x) for x in stops}) > 2, stops
    for max_new in (1, 2, 7, 24):
        kw = dict(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
        ref = model.generate(**kw)
        out, stats = medusa_generate(model, f"medusa(heads='{path}')", **kw)
        assert torch.equal(out, ref), f"max_new_tokens={max_new}"
        new = ref[:, t:]
        is_eos = (new == eos).long()
        ends = torch.where(is_eos.any(1), is_eos.argmax(1) + 1, new.shape[1])
        assert stats["generated"] == int(ends.sum())


def random_heads(model, path, num_heads=3, std=0.05):
    heads = MedusaHeads(model.config.hidden_size, num_heads)
    with torch.no_grad():
        for block in heads.blocks:
            block.weight.normal_(0, std)
    save_heads(heads, path)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tree", ["default", "3,2,1"])
def test_greedy_identical_random_models(arch, tree, tmp_path):
    model = build(arch)
    spec = f"medusa(heads='{random_heads(model, tmp_path / 'h')}', tree='{tree}')"
    g = torch.Generator().manual_seed(1)
    singles = [torch.randint(3, VOCAB, (1, int(n)), generator=g) for n in torch.randint(2, 12, (6,), generator=g)]
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    refs = [model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw) for p in singles]
    hf_accel.apply(model, spec)
    for p, ref in zip(singles, refs):
        assert torch.equal(model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw), ref)
    hf_accel.remove(model)
    for seed in range(3):  # left-padded batches of 4, rows of different lengths, EOS (id 2) where rows produce it
        ids, mask = prompts(4, seed)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
        ref = model.generate(**kw)
        out, stats = medusa_generate(model, spec, **kw)
        assert torch.equal(out, ref), f"{arch} {tree} prompt set {seed}"
        assert stats["batch"] == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eos_in_some_rows_random_models(arch, tmp_path):
    model = build(arch)
    spec = f"medusa(heads='{random_heads(model, tmp_path / 'h')}')"
    ids, mask = prompts(4, seed=7)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    eos = int(free[0, 6])
    stops = [(row == eos).nonzero()[:1].tolist() for row in free]
    assert len({str(x) for x in stops}) > 1, "rows should stop at different steps"
    for max_new in (1, 5, 20):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=eos)
        out, _ = medusa_generate(model, spec, **kw)
        assert torch.equal(out, model.generate(**kw)), f"max_new_tokens={max_new}"


@pytest.mark.filterwarnings("ignore:hf_accel.remove")
def test_composes_with_int8(tmp_path):
    import copy

    model = copy.deepcopy(build("llama"))
    spec = f"medusa(heads='{random_heads(model, tmp_path / 'h')}')"
    hf_accel.apply(model, "int8")
    ids, mask = prompts(4, seed=5)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    ref = model.generate(**kw)  # the int8 model alone
    out, stats = medusa_generate(model, spec, **kw)
    assert torch.equal(out, ref) and stats["accepted"] > 0
    assert list(hf_accel.get_config(model).names) == ["int8"]


def test_tree_shapes():
    paths = parse_tree("2,2", 3)
    assert paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1))
    tree = build_tree(paths)
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2]
    assert tree.visible[5].tolist() == [True, False, True, False, False, True, False]
    assert tree.head.tolist() == [0, 0, 1, 1, 1, 1] and tree.rank.tolist() == [0, 1, 0, 1, 0, 1]
    assert all(len(p) <= 2 for p in parse_tree("default", 2))


def test_accept_path_per_row():
    """Each row keeps its own deepest matching path; the next token is the target's draw at its end."""
    tree = build_tree(parse_tree("2,2", 2))  # nodes: 0 root; 1, 2 depth 1; 3, 4 under 1; 5, 6 under 2
    nodes = torch.tensor([[9, 10, 11, 12, 13, 14, 15]] * 3)
    draws = torch.tensor([[11, 20, 14, 20, 20, 20, 20],    # root draws 11 = node 2, node 2 draws 14 = node 5
                          [30, 20, 20, 20, 20, 20, 20],    # nothing matches: the root's draw
                          [10, 13, 20, 20, 20, 20, 20]])   # node 1, then node 4 (depth 2), whose draw is 20
    path, accepted, nxt = decode.accept_path(draws, nodes, tree)
    assert accepted.tolist() == [2, 0, 2] and nxt.tolist() == [20, 30, 20]
    assert path[0].tolist() == [0, 2, 5] and path[1, 0] == 0 and path[2].tolist() == [0, 1, 4]


def test_bad_options_and_batches(tmp_path):
    model = build("llama")
    with pytest.raises(OptionError, match="needs option 'heads'"):
        hf_accel.apply(model, "medusa")
    with pytest.raises(OptionError, match="tree"):
        hf_accel.apply(model, "medusa(heads='x', tree='3,zero')")
    with pytest.raises(ArtifactError):
        hf_accel.apply(model, f"medusa(heads='{tmp_path / 'missing'}')")
    save_heads(MedusaHeads(model.config.hidden_size, 2), tmp_path / "h2")
    with pytest.raises(OptionError, match="at most one per head"):
        hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h2'}', tree='2,2,2')")
    save_heads(MedusaHeads(32, 2), tmp_path / "h32")
    with pytest.raises(AccelError, match="hidden size"):
        hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h32'}')")
    assert "generate" not in vars(model)  # refused specs leave the model unchanged
    hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h2'}')")
    ids = torch.randint(3, VOCAB, (2, 5))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # batches and sampling run Medusa, no fallback
        assert model.generate(**kw, do_sample=False).shape == (2, 9)
        assert model.generate(**kw, do_sample=True).shape[0] == 2
    assert model.hf_accel_spec_stats["sampling"] and model.hf_accel_spec_stats["batch"] == 2
    with pytest.warns(UserWarning, match="RepetitionPenalty"):  # what the loop cannot serve exactly falls back
        model.generate(**kw, do_sample=False, repetition_penalty=1.2)
    assert "RepetitionPenalty" in model.hf_accel_spec_stats["fallback"]


# ------------------------------------------------------------------------------------------------ sampling
V_SMALL, NEW, ROWS = 6, 3, 6000
WARP = dict(temperature=0.8, top_k=4, top_p=0.95)
WARPERS = [TemperatureLogitsWarper(0.8), TopKLogitsWarper(4), TopPLogitsWarper(0.95)]


def exact_distribution(model, prompt) -> torch.Tensor:
    """P(x1, x2, x3 | prompt) after the warpers, [V, V, V], by enumeration."""
    def probs(scores):
        for w in WARPERS:
            scores = w(None, scores)
        return torch.softmax(scores, -1)

    v = V_SMALL
    with torch.no_grad():
        pairs = torch.cartesian_prod(torch.arange(v), torch.arange(v))  # [V*V, 2]
        logits = model(input_ids=torch.cat([prompt.expand(v * v, -1), pairs], 1)).logits.float()
    p1 = probs(logits[:1, -3])[0]  # [V]
    p2 = probs(logits[::v, -2])  # [V, V]: row x1
    p3 = probs(logits[:, -1]).reshape(v, v, v)  # [x1, x2, V]
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.fixture(scope="module")
def small_medusa(tmp_path_factory):
    """(target, heads spec, prompt, exact distribution): 6-token vocabulary, two random heads, tree 3,2."""
    target = small_vocab_model(0)
    torch.manual_seed(4)
    path = random_heads(target, tmp_path_factory.mktemp("small_medusa") / "h", num_heads=2, std=0.5)
    prompt = torch.tensor([[1, 3, 2, 5, 4, 3, 2]])
    return target, f"medusa(heads='{path}', tree='3,2')", prompt, exact_distribution(target, prompt)


def sample_counts(model, prompt, seed) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = prompt.expand(ROWS, -1).contiguous()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=True,
                         **WARP)[:, -NEW:]
    return torch.bincount((out[:, 0] * V_SMALL + out[:, 1]) * V_SMALL + out[:, 2],
                          minlength=V_SMALL ** 3).reshape(V_SMALL, V_SMALL, V_SMALL)


def test_sampling_follows_target_distribution(small_medusa):
    target, spec, prompt, exact = small_medusa
    own = sample_counts(target, prompt, seed=0)  # the target's own sampling, for scale
    assert chi_square_p(own, exact) > 1e-3
    hf_accel.apply(target, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            counts = sample_counts(target, prompt, seed=1)
        stats = dict(target.hf_accel_spec_stats)
    finally:
        hf_accel.remove(target)
    assert stats["sampling"] and stats["batch"] == ROWS and "fallback" not in stats
    assert stats["accepted"] > 0.3 * stats["row_rounds"]  # the tree's candidates were kept often
    assert chi_square_p(counts, exact) > 1e-3
    assert total_variation(counts, exact) < 0.06


def typical_acceptance(sampler, logits, nodes, tree):
    """WRONG (lossy, Medusa's 'typical acceptance' in spirit): a candidate the target finds plausible (p >= 0.15) is
    taken instead of the target's own draw."""
    p = sampler.probs(logits)  # [B, N, V]
    draws = torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(nodes.shape)
    for child in range(nodes.shape[1] - 1, 0, -1):  # the lowest-index plausible child wins
        parent = int(tree.parent[child])
        p_child = p[:, parent].gather(1, nodes[:, child: child + 1])[:, 0]
        draws[:, parent] = torch.where(p_child >= 0.15, nodes[:, child], draws[:, parent])
    return decode.accept_path(draws, nodes, tree)


def resample_from_p(sampler, logits, nodes, tree):
    """WRONG: try each candidate with probability p(c), and after every candidate is rejected draw from p instead of
    from p without the rejected candidates (the residual)."""
    p = sampler.probs(logits)
    draws = torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(nodes.shape)
    decided = torch.zeros_like(draws, dtype=torch.bool)
    for child in range(1, nodes.shape[1]):
        parent = int(tree.parent[child])
        p_child = p[:, parent].gather(1, nodes[:, child: child + 1])[:, 0]
        take = ~decided[:, parent] & (torch.rand_like(p_child) < p_child)
        draws[:, parent] = torch.where(take, nodes[:, child], draws[:, parent])
        decided[:, parent] |= take
    return decode.accept_path(draws, nodes, tree)


@pytest.mark.parametrize("wrong", [typical_acceptance, resample_from_p])
def test_sampling_test_detects_wrong_acceptance(small_medusa, monkeypatch, wrong):
    monkeypatch.setattr(decode, "verify_tree", wrong)
    target, spec, prompt, exact = small_medusa
    hf_accel.apply(target, spec)
    try:
        counts = sample_counts(target, prompt, seed=1)
    finally:
        hf_accel.remove(target)
    assert chi_square_p(counts, exact) < 1e-6


def test_train_script_cpu(tmp_path):
    import importlib.util
    from pathlib import Path

    from hf_accel.quality.reference import reference_path

    try:
        base = reference_path("tiny")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(str(e))
    spec = importlib.util.spec_from_file_location("train_medusa", Path(__file__).parents[1] / "scripts/train_medusa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--model", str(base), "--out", str(tmp_path / "o"), "--heads", "2", "--steps", "3", "--seq-len", "16",
              "--batch", "2", "--device", "cpu"])
    assert load_heads(str(tmp_path / "o"))[0].num_heads == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_identical_gpu(tmp_path):
    model = build("llama").cuda()
    heads = MedusaHeads(model.config.hidden_size, 3)
    save_heads(heads, tmp_path / "h")
    p = torch.randint(3, VOCAB, (1, 8), device="cuda")
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    ref = model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw)
    hf_accel.apply(model, f"medusa(heads='{tmp_path / 'h'}')")
    assert torch.equal(model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw), ref)
