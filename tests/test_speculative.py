"""Speculative decoding plugins (draft, selfdraft, lookup, recycle): lossless at batch 1 and with ragged batches.

Greedy outputs are compared token for token with the target's own `generate()` (fp32, left-padded prompts of
different lengths); sampled outputs are compared with the target's exact sequence distribution by a chi-square test
whose power is checked on the draft model's own samples.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import VOCAB, build, make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, pipeline
from transformers.generation.streamers import BaseStreamer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import hf_accel
from hf_accel.errors import AccelError, ConflictError

METHODS = ("draft", "draft_adaptive", "selfdraft", "lookup", "recycle")


def spec_for(method: str, draft_dir) -> str:
    return {
        "draft": f"draft(draft='{draft_dir}', k=3)",
        "draft_adaptive": f"draft(draft='{draft_dir}', k=6, adaptive=True)",
        "selfdraft": "selfdraft(k=3)",
        "lookup": "lookup(k=4)",
        "recycle": "recycle(k=3)",
    }[method]


def smaller_perturbed_copy(target, layers: int, noise: float, seed: int = 5):
    """A draft that agrees with the target often but not always: its first `layers` layers, weights + noise."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    draft = type(target)(config).eval()
    g = torch.Generator().manual_seed(seed)
    source = target.state_dict()
    with torch.no_grad():
        for name, value in draft.state_dict().items():
            w = source[name]
            value.copy_(w + noise * w.std() * torch.randn(w.shape, generator=g) if w.dim() > 1 else w)
    return draft


def prompts(batch: int, seed: int, lengths=None):
    """Left-padded random prompts of different lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(2, 14, (batch,), generator=g)]
    t = max(lengths)
    ids = torch.zeros(batch, t, dtype=torch.long)
    mask = torch.zeros(batch, t, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, t - n:] = 1
    return ids, mask


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def n_generated(out, prompt_len: int, eos: int = 2) -> int:
    """Tokens generate() produced per row up to and including the row's EOS, summed over rows."""
    new = out[:, prompt_len:]
    is_eos = (new == eos).long()
    ends = torch.where(is_eos.any(1), is_eos.argmax(1) + 1, new.shape[1])
    return int(ends.sum())


@pytest.fixture(scope="module")
def target():
    return build("llama", seed=0)


@pytest.fixture(scope="module")
def draft_dir(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "draft"
    smaller_perturbed_copy(target, layers=1, noise=0.3).save_pretrained(path)
    return path


def generate_with(model, spec, *args, **kwargs):
    hf_accel.apply(model, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a silent fallback to transformers' loop fails the test
            out = model.generate(*args, **kwargs)
        return out, dict(model.hf_accel_spec_stats)
    finally:
        hf_accel.remove(model)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_identical_to_target(target, draft_dir, method, batch):
    rounds = generated = 0
    for seed in range(6):
        ids, mask = prompts(batch, seed)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        ref = target.generate(**kw)
        out, stats = generate_with(target, spec_for(method, draft_dir), **kw)
        assert torch.equal(out, ref), f"{method} batch {batch} prompt set {seed}"
        assert "fallback" not in stats and stats["generated"] == n_generated(ref, ids.shape[1])
        rounds += stats["row_rounds"]
        generated += stats["generated"]
    assert rounds < generated  # the drafts were accepted at times: fewer verify steps than tokens
    assert "generate" not in vars(target) and not hasattr(target, "hf_accel_spec_stats")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma", "mistral"])
def test_greedy_other_architectures(arch, tmp_path):
    model = build(arch, seed=0)
    path = tmp_path / "draft"
    smaller_perturbed_copy(model, layers=2, noise=0.3).save_pretrained(path)
    ids, mask = prompts(4, seed=11)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    ref = model.generate(**kw)
    for spec in (f"draft(draft='{path}', k=3)", "lookup(k=3)"):
        out, _ = generate_with(model, spec, **kw)
        assert torch.equal(out, ref), f"{arch} {spec}"


def test_identical_draft_accepts_every_token(target, tmp_path):
    target.save_pretrained(tmp_path / "same")
    ids, mask = prompts(4, seed=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out, stats = generate_with(target, f"draft(draft='{tmp_path / 'same'}', k=4)", **kw)
    assert torch.equal(out, target.generate(**kw))
    assert stats["mean_accepted"] == 4 and stats["acceptance_rate"] == 1.0
    assert stats["rounds"] == 4  # 20 tokens, 5 per verify step


def test_stats_report_partial_acceptance(target, draft_dir):
    ids, mask = prompts(4, seed=2)
    _, stats = generate_with(target, spec_for("draft", draft_dir), input_ids=ids, attention_mask=mask,
                             max_new_tokens=24, do_sample=False)
    assert 0 < stats["mean_accepted"] < 3
    assert stats["tokens_per_verify"] == pytest.approx(stats["generated"] / stats["row_rounds"])
    assert stats["accepted"] <= stats["drafted"] == 3 * stats["row_rounds"]


def test_best_draft_length():
    from hf_accel.plugins.speculative.decode import best_draft_length

    assert best_draft_length(0.9, 8, 0.05) == 8  # drafts almost always kept and cheap: draft to the bound
    assert best_draft_length(0.2, 8, 0.05) == 1  # mostly rejected: one token
    assert best_draft_length(0.99, 8, 1.0) == 1  # a draft as costly as the target never pays
    ks = [best_draft_length(a / 10, 8, 0.1) for a in range(10)]
    assert ks == sorted(ks) and ks[0] < ks[-1]  # more acceptance, longer drafts


def test_adaptive_draft_length_follows_acceptance(target, tmp_path):
    ids, mask = prompts(4, seed=4)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False)
    bad = tmp_path / "bad"
    build("llama", seed=9).save_pretrained(bad)  # unrelated weights: almost nothing is accepted
    _, stats = generate_with(target, f"draft(draft='{bad}', k=6, adaptive=True)", **kw)
    assert stats["mean_accepted"] < 0.2 and max(stats["draft_lengths"][3:]) <= 2
    # lookup on the model's own (repetitive) output: k drops while nothing matches, grows once loops appear
    out, stats = generate_with(target, "lookup(k=6, adaptive=True)", **kw)
    assert torch.equal(out, target.generate(**kw))
    lengths = stats["draft_lengths"]
    assert min(lengths) <= 2 and max(lengths[lengths.index(min(lengths)):]) >= 5


@pytest.mark.parametrize("method", ["draft", "lookup"])
def test_eos_and_max_new_tokens_per_row(target, draft_dir, method):
    ids, mask = prompts(4, seed=7)
    free = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    # an EOS id that the rows reach at different steps (or never)
    eos = int(free[0, 6])
    stops = [(row == eos).nonzero()[:1].tolist() for row in free]
    assert len({str(s) for s in stops}) > 1, "rows should stop at different steps"
    for max_new in (1, 5, 20):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=eos)
        ref = target.generate(**kw)
        out, stats = generate_with(target, spec_for(method, draft_dir), **kw)
        assert torch.equal(out, ref), f"max_new_tokens={max_new}"
        assert stats["generated"] == n_generated(ref, ids.shape[1], eos)


@pytest.mark.filterwarnings("ignore:hf_accel.remove")
@pytest.mark.parametrize("method", ["draft", "lookup", "recycle"])
def test_composes_with_int8(target, draft_dir, method):
    model = copy.deepcopy(target)
    hf_accel.apply(model, "int8")
    ids, mask = prompts(4, seed=5)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    ref = model.generate(**kw)  # the int8 model alone
    out, stats = generate_with(model, spec_for(method, draft_dir), **kw)
    assert torch.equal(out, ref) and stats["generated"] == n_generated(ref, ids.shape[1])
    assert list(hf_accel.get_config(model).names) == ["int8"]  # remove() keeps the rewritten weights


def test_selfdraft_is_int8_copy_and_conflicts_with_quantized_target(target):
    model = copy.deepcopy(target)
    hf_accel.apply(model, "selfdraft(k=2)")
    assert not any(type(m).__name__ == "Int8Linear" for m in model.modules())  # the target keeps its weights
    hf_accel.remove(model)
    with pytest.raises(ConflictError):
        hf_accel.apply(model, "int8+selfdraft")


def test_remove_restores_generate(target, draft_dir):
    before = target.generate
    hf_accel.apply(target, spec_for("draft", draft_dir))
    assert "generate" in vars(target) and target.generate != before
    assert hf_accel.remove(target) == []
    assert "generate" not in vars(target) and target.generate == before
    assert not hasattr(target, "hf_accel_spec_stats")


class Collect(BaseStreamer):
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.reshape(-1))

    def end(self):
        self.ended = True


def test_streamer_gets_every_token_once(target, draft_dir):
    ids, mask = prompts(1, seed=8)
    streamer = Collect()
    out, stats = generate_with(target, spec_for("draft", draft_dir), input_ids=ids, attention_mask=mask,
                               max_new_tokens=16, do_sample=False, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat(streamer.puts), out[0])  # the prompt first, then new tokens
    assert len(streamer.puts) == 1 + stats["rounds"]


def test_bad_options():
    with pytest.raises(AccelError, match="needs option 'draft'"):
        hf_accel.AccelConfig.from_spec("draft(k=4)")
    with pytest.raises(AccelError, match="'k' must be in"):
        hf_accel.AccelConfig.from_spec("lookup(k=0)")
    with pytest.raises(ConflictError):
        hf_accel.AccelConfig.from_spec("lookup+recycle")


def test_draft_with_another_vocabulary_is_refused(target, tmp_path):
    config = copy.deepcopy(target.config)
    config.vocab_size = 64
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    before = target.generate
    with pytest.raises(AccelError, match="vocabulary"):
        hf_accel.apply(target, f"draft(draft='{tmp_path / 'other'}')")
    assert target.generate == before and not hasattr(target, "hf_accel_spec_stats")


def test_unservable_calls_fall_back_to_transformers(target):
    ids, mask = prompts(4, seed=6)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
    ref = target.generate(**kw)
    hf_accel.apply(target, "lookup")
    try:
        with pytest.warns(UserWarning, match="RepetitionPenalty"):
            out = target.generate(**kw)
        assert torch.equal(out, ref) and "RepetitionPenalty" in target.hf_accel_spec_stats["fallback"]
    finally:
        hf_accel.remove(target)


def test_pipeline_batched(target):
    tok = make_tokenizer()
    tok.padding_side = "left"
    texts = ["def f(x):", "import os", "for i in range(10): print(i)", "x"]
    kw = dict(max_new_tokens=12, do_sample=False, batch_size=4)
    ref = pipeline("text-generation", model=target, tokenizer=tok)(texts, **kw)
    pipe = pipeline("text-generation", model=target, tokenizer=tok, accel="lookup(k=3)")
    try:
        assert pipe(texts, **kw) == ref
        assert target.hf_accel_spec_stats["batch"] == 4
    finally:
        hf_accel.remove(target)


# ------------------------------------------------------------------------------------------------ sampling
V_SMALL, NEW, ROWS = 6, 2, 3000


def small_vocab_model(seed: int, sharpness: float = 8.0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V_SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)  # peaked, distinct distributions
    return model


def exact_distribution(model, prompt, warpers) -> torch.Tensor:
    """P(x1, x2 | prompt) after the warpers, [V, V], by enumeration."""
    def probs(scores):
        for w in warpers:
            scores = w(None, scores)
        return torch.softmax(scores, -1)

    with torch.no_grad():
        seqs = torch.cat([prompt.expand(V_SMALL, -1), torch.arange(V_SMALL)[:, None]], 1)
        logits = model(input_ids=seqs).logits.float()
    p1 = probs(logits[:1, -2])[0]
    p2 = probs(logits[:, -1])
    return p1[:, None] * p2


def chi_square_p(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    """p-value of Pearson's chi-square (cells with expected count < 5 pooled; Wilson-Hilferty approximation)."""
    n = counts.sum()
    expected = expected_p.flatten() * n
    counts = counts.flatten().double()
    small = expected < 5
    cells_o = torch.cat([counts[~small], counts[small].sum()[None]])
    cells_e = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = cells_e > 0
    stat = float(((cells_o[keep] - cells_e[keep]) ** 2 / cells_e[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample_counts(model, prompt, **kw) -> torch.Tensor:
    ids = prompt.expand(ROWS, -1).contiguous()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=True,
                         **kw)[:, -NEW:]
    return torch.bincount(out[:, 0] * V_SMALL + out[:, 1], minlength=V_SMALL * V_SMALL).reshape(V_SMALL, V_SMALL)


WARP = dict(temperature=0.8, top_k=4, top_p=0.95)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """(target, draft dir, prompt, exact distribution) on a 6-token vocabulary; the draft is a perturbed copy."""
    target = small_vocab_model(0)
    path = tmp_path_factory.mktemp("small") / "draft"
    smaller_perturbed_copy(target, layers=2, noise=0.5, seed=3).save_pretrained(path)
    prompt = torch.tensor([[1, 3, 2, 5, 4, 3, 2]])
    warpers = [TemperatureLogitsWarper(0.8), TopKLogitsWarper(4), TopPLogitsWarper(0.95)]
    return target, path, prompt, exact_distribution(target, prompt, warpers)


def speculative_counts(target, spec, prompt, seed):
    hf_accel.apply(target, spec)
    try:
        torch.manual_seed(seed)
        return sample_counts(target, prompt, **WARP), dict(target.hf_accel_spec_stats)
    finally:
        hf_accel.remove(target)


def total_variation(counts, exact) -> float:
    return 0.5 * float((counts / counts.sum() - exact).abs().sum())


def test_sampling_test_has_power(small_pair):
    """The statistic accepts the target's own samples and rejects the draft's."""
    target, path, prompt, exact = small_pair
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    assert chi_square_p(sample_counts(target, prompt, **WARP), exact) > 1e-3
    draft = AutoModelForCausalLM.from_pretrained(path)
    assert chi_square_p(sample_counts(draft, prompt, **WARP), exact) < 1e-6


@pytest.mark.parametrize("method", ["draft", "lookup"])
def test_sampling_follows_target_distribution(small_pair, method):
    target, path, prompt, exact = small_pair
    spec = f"draft(draft='{path}', k=2)" if method == "draft" else "lookup(k=2)"
    counts, stats = speculative_counts(target, spec, prompt, seed=1)
    assert stats["sampling"] and stats["batch"] == ROWS and 0.1 < stats["acceptance_rate"] < 0.9
    assert chi_square_p(counts, exact) > 1e-3
    assert total_variation(counts, exact) < 0.06


def test_sampling_residual_bug_is_detected(small_pair, monkeypatch):
    """Resampling a rejected position from p instead of norm(max(0, p - q)) biases the output; the test sees it."""
    from hf_accel.plugins.speculative import decode

    right = decode.verify

    def wrong(sampler, logits, drafts, draft_probs):
        accepted, _ = right(sampler, logits, drafts, draft_probs)
        p = sampler.probs(logits)[torch.arange(len(accepted)), accepted]
        return accepted, decode.with_token(drafts, accepted, torch.multinomial(p, 1)[:, 0])

    monkeypatch.setattr(decode, "verify", wrong)
    target, path, prompt, exact = small_pair
    counts, _ = speculative_counts(target, f"draft(draft='{path}', k=2)", prompt, seed=1)
    assert chi_square_p(counts, exact) < 1e-6 and total_variation(counts, exact) > 0.06


# ------------------------------------------------------------------------------------------------ reference model
def test_tiny_reference_model():
    """The project's tiny reference (trained on the Python stdlib) with its natural text: every draft-free and
    self-draft method is greedy-identical and lookup finds real n-gram matches."""
    from hf_accel.quality.reference import load_reference

    try:
        model, tok = load_reference("tiny")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"tiny reference model not built: {e}")
    tok.padding_side = "left"
    texts = ["import os\nimport sys\n\ndef main(", "class Foo:\n    def __init__(self", "for i in range(", "# "]
    enc = tok(texts, return_tensors="pt", padding=True)
    kw = dict(**enc, max_new_tokens=32, do_sample=False)
    ref = model.generate(**kw)
    for spec in ("lookup(k=4)", "recycle(k=3)", "selfdraft(k=3)"):
        out, stats = generate_with(model, spec, **kw)
        assert torch.equal(out, ref), spec
        assert stats["mean_accepted"] > 0.1, spec
