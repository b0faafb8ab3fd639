"""The quality harness, measured on the shipped `tiny` reference model (CPU, a few seconds each)."""
import copy
import json
import random

import pytest
import torch

from hf_accel.quality import (
    ReferenceModelMissing, by_metric, greedy_agreement, load_reference, multi_turn_recall, needle_recall,
    perplexity, perplexity_change, source_files, unigram_perplexity,
)
from hf_accel.quality.corpus import token_stream
from hf_accel.quality.needle import Needle, insert_needles, needle_training_example

PPL_TOKENS = 4096  # held-out tokens per perplexity measurement: enough to separate the models, fast on 2 cores
AGREEMENT = dict(n_prompts=8, prompt_len=32, new_tokens=16)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_reference("tiny")


@pytest.fixture(scope="module")
def damaged(tiny):
    """tiny with layer 2's attention output zeroed: about +18% held-out perplexity."""
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    model.config.name_or_path = "reference/tiny-damaged"
    return model


def test_corpus_split_is_deterministic_and_about_5_percent():
    files = source_files()
    heldout = source_files("heldout")
    assert [f.relpath for f in files] == sorted(f.relpath for f in files)
    assert all(f.relpath.startswith("stdlib/") and "site-packages" not in f.relpath for f in files)
    assert 0.02 < len(heldout) / len(files) < 0.08
    assert {f.relpath for f in heldout}.isdisjoint(f.relpath for f in source_files("train"))


def test_tokenizer_round_trips_code(tiny):
    _, tok = tiny
    text = "def f(x):\n\tif x:  # héllo ✓\n        return {'a': [1, 2]}\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("config_cls", ["LlamaConfig", "Qwen2Config"])
def test_saved_tokenizer_reloads_through_auto_tokenizer_unchanged(tmp_path, config_cls):
    """transformers 5 loads a `qwen2` checkpoint's tokenizer as Qwen2Tokenizer whatever tokenizer_config.json says
    (it rebuilds NFC + Qwen2's split regex + an <|endoftext|> token): the qwen2-style tokenizer must survive that,
    or a reference model is evaluated on tokens it was not trained on (seen on the H200: qwen2-small's held-out
    perplexity 52.6 and unigram baseline 650 against Llama small's 18.7 and 929, same corpus)."""
    import transformers
    from transformers import AutoTokenizer

    from hf_accel.quality import iter_texts, train_tokenizer

    texts = [t for _, t in zip(range(40), iter_texts("train"))]
    style = "qwen2" if config_cls == "Qwen2Config" else "gpt2"
    tok = train_tokenizer(texts, 600, style=style)
    tok.save_pretrained(tmp_path)
    getattr(transformers, config_cls)(vocab_size=len(tok)).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "".join(texts[:3])[:20000] + "\n\tif x:  # héllo ✓ Ｆｕｌｌ e\u0301\r\n    return {'a': [1, 2]}  \n"
    assert len(loaded) == len(tok)
    assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_tiny_perplexity_far_below_unigram(tiny):
    model, tok = tiny
    ppl = perplexity(model, tok, max_tokens=PPL_TOKENS)
    unigram = unigram_perplexity(tok, max_train_tokens=100_000, max_tokens=PPL_TOKENS)
    assert ppl["params"]["tokens"] == PPL_TOKENS - 1 == unigram["params"]["tokens"]
    assert ppl["value"] < unigram["value"] / 5


def test_self_agreement_is_perfect(tiny):
    model, tok = tiny
    values = by_metric(greedy_agreement(model, model, tok, **AGREEMENT))
    assert values["greedy_identical_fraction"] == 1.0
    assert values["greedy_first_divergence_mean"] == AGREEMENT["new_tokens"]
    assert values["teacher_forced_kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert values["teacher_forced_top1_agreement"] == 1.0


def test_damaged_model_is_measurably_worse(tiny, damaged):
    model, tok = tiny
    ref, ours, change = perplexity_change(damaged, model, tok, max_tokens=PPL_TOKENS)
    assert ours["value"] > ref["value"] and change["value"] > 0.05
    assert change["params"]["reference"] == "reference/tiny"
    values = by_metric(greedy_agreement(damaged, model, tok, **AGREEMENT))
    assert values["greedy_identical_fraction"] < 1.0
    assert values["greedy_first_divergence_mean"] < AGREEMENT["new_tokens"]
    assert values["teacher_forced_kl_mean"] > 0.01
    assert values["teacher_forced_top1_agreement"] < 0.98


def test_needle_placement_and_training_examples(tiny):
    _, tok = tiny
    rng = random.Random(0)
    stream = token_stream(tok, "heldout", 4096)
    needle = Needle.random(rng)
    hay = stream[:500]
    text = tok.decode(insert_needles(tok, hay, [needle], [0.5]))
    assert needle.line in text and (text.index(needle.line) == 0 or text[text.index(needle.line) - 1] == "\n")
    example = needle_training_example(rng, stream, tok, 257)
    assert example.shape == (257,) and "NEEDLE_" in tok.decode(example)


def test_needle_and_multi_turn_records_are_sane_and_json(tiny):
    model, tok = tiny
    record = needle_recall(model, tok, depths=(0.0, 0.5, 1.0), n_per_depth=2)
    turns = multi_turn_recall(model, tok, n_trials=2)
    assert record["metric"] == "needle_recall" and 0.0 <= record["value"] <= 1.0
    assert record["params"]["context_len"] == model.config.max_position_embeddings
    assert set(record["params"]["by_depth"]) == {"0.0", "0.5", "1.0"}
    assert [r["metric"] for r in turns] == ["multi_turn_recall_turn1", "multi_turn_recall_turn2"]
    for r in [record, *turns]:
        assert json.loads(json.dumps(r)) == r
        assert r["model"] == "reference/tiny" and r["versions"]["torch"] and r["date"] and r["command"]


def test_built_references_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ACCEL_HOME", str(tmp_path))
    with pytest.raises(ReferenceModelMissing, match="build_reference.py --model base"):
        load_reference("base")
    with pytest.raises(ValueError, match="unknown reference model"):
        load_reference("huge")
