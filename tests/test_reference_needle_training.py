"""The needle rows the reference models train on: the answer mask marks exactly the answer tokens as next-token
targets, and the training format is token for token what `needle_recall` asks (CPU, tiny tokenizer, seconds)."""
import dataclasses
import importlib.util
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from hf_accel.quality import load_reference
from hf_accel.quality.corpus import token_stream
from hf_accel.quality.needle import Needle, _encode, _haystack_prompt, needle_training_row

ROOT = Path(__file__).resolve().parents[1]
QUERY = re.compile(r"\nprint\((NEEDLE_\w{6})\)  # -> '")
LINE = re.compile(r"(NEEDLE_\w{6}) = '(\w{8})'\n")


def _build_reference():
    if "build_reference" not in sys.modules:  # registered first: dataclasses look their module up
        spec = importlib.util.spec_from_file_location("build_reference", ROOT / "scripts" / "build_reference.py")
        sys.modules["build_reference"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["build_reference"])
    return sys.modules["build_reference"]


@pytest.fixture(scope="module")
def tok():
    return load_reference("tiny")[1]


@pytest.fixture(scope="module")
def stream(tok):
    return token_stream(tok, "heldout", 65536)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in a 1-D bool mask."""
    edges = torch.diff(torch.cat([torch.tensor([0]), mask.int(), torch.tensor([0])]))
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))


@pytest.mark.parametrize("seed", range(8))
def test_answer_mask_marks_exactly_the_answer_tokens(tok, stream, seed):
    rng = random.Random(seed)
    row, mask = needle_training_row(rng, stream, tok, 513, max_needles=4, edge_prob=0.5)
    assert row.shape == mask.shape == (513,) and mask.dtype == torch.bool
    text = tok.decode(row)
    values = dict(LINE.findall(text))
    asked = QUERY.findall(text)
    assert asked and set(asked) == set(values)
    runs = _runs(mask)
    assert len(runs) == len(asked)  # one run of answer tokens per question, nothing else
    for (start, end), key in zip(runs, asked):
        assert tok.decode(row[start:end]) == values[key] + "'\n"  # exactly the answer, closing quote and newline
        assert tok.decode(row[:start]).endswith(f"print({key})  # -> '")  # right after its question


def test_loss_targets_are_the_answers_shifted_by_one(tok, stream):
    """train() weights token_loss[answers]: the masked *targets* (next tokens) must be the answers, predicted from
    the positions that end each question (an off-by-one would weight the last question token and drop the last
    answer token)."""
    br = _build_reference()
    p = dataclasses.replace(br.PRESETS["tiny"], batch=4, context=512, needle_fraction=1.0, max_needles=3)
    rows, masks = br.sample_batch(p, stream, tok, random.Random(0))
    inputs, targets, answers = br.next_token_targets(rows, masks)
    assert inputs.shape == targets.shape == answers.shape == (4, 512)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for b in range(4):
        text = tok.decode(rows[b])
        values = dict(LINE.findall(text))
        expected = "".join(values[k] + "'\n" for k in QUERY.findall(text))
        assert tok.decode(targets[b][answers[b]]) == expected
        for start, _ in _runs(answers[b]):  # the input predicting the first answer token ends the question
            assert tok.decode(inputs[b, : start + 1]).endswith("  # -> '")


def test_training_tail_tokenizes_like_the_evaluation_prompt(tok, stream):
    """The question in a training row is the same tokens as the end of an evaluation prompt, and the answer
    tokens are the value's tokens in the needle line (no BPE merge across the question/answer boundary)."""
    rng = random.Random(0)
    for _ in range(300):
        n = Needle.random(rng)
        q, qa, line = _encode(tok, n.query), _encode(tok, n.query + n.answer), _encode(tok, n.line)
        assert torch.equal(qa[: len(q)], q)
        answer = qa[len(q):]
        assert torch.equal(line[len(line) - len(answer):], answer)  # `... = '` + same value tokens + `'\n`
    prompt = _haystack_prompt(tok, stream, random.Random(1), 500, [n], [0.5], n)
    assert prompt.shape == (500,) and torch.equal(prompt[-len(q):], _encode(tok, n.query))


def test_curriculum_samples_short_rows_first_with_the_same_tokens_per_step(tok, stream):
    """The short-to-long curriculum: the first `short_share` of the steps sample rows of `short_context` tokens,
    as many tokens per step as the full-context rows, then the preset's own context."""
    br = _build_reference()
    p = dataclasses.replace(br.PRESETS["tiny"], context=512, batch=2, short_context=128, short_share=0.5)
    rng = random.Random(0)
    shapes = [br.sample_batch(p.phase(step, 10), stream, tok, rng)[0].shape for step in range(10)]
    assert shapes[:5] == [torch.Size([8, 129])] * 5  # 2 * 512 / 128 rows of short_context + 1 (shifted targets)
    assert shapes[5:] == [torch.Size([2, 513])] * 5
    assert br.PRESETS["tiny"].phase(0, 10) is br.PRESETS["tiny"]  # no curriculum: the preset itself
    base = br.PRESETS["base"]
    assert base.phase(0, 1500).batch * base.phase(0, 1500).context == base.batch * base.context
