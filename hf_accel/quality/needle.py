"""Needle-in-a-haystack retrieval: the format the long-context reference models are trained on, and its tests.

A needle is a Python assignment ``NEEDLE_<6 chars> = '<8 chars>'`` placed at a line start inside a haystack of
held-out source files; the query appended at the end is ``print(NEEDLE_...)  # -> '`` and the expected answer
is the value followed by the closing quote. Training examples (see :func:`needle_training_example`) are built
by the same functions, so the format cannot drift between training and evaluation.
"""
from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass

import torch

from ..compat import cache_kwarg, output_cache
from .agreement import greedy_generate
from .corpus import token_stream
from .records import make_record

ALPHABET = string.ascii_lowercase + string.digits
ANSWER_TOKENS = 12  # generated tokens per question; an 8-char value plus quote needs fewer
SNAP_WINDOW = 256  # how far back to look for a line start when placing a needle


@dataclass(frozen=True)
class Needle:
    key: str
    value: str

    @classmethod
    def random(cls, rng: random.Random) -> "Needle":
        word = lambda n: "".join(rng.choice(ALPHABET) for _ in range(n))  # noqa: E731
        return cls("NEEDLE_" + word(6), word(8))

    @property
    def line(self) -> str:
        return f"{self.key} = '{self.value}'\n"

    @property
    def query(self) -> str:
        return f"\nprint({self.key})  # -> '"

    @property
    def answer(self) -> str:
        return f"{self.value}'\n"

    def recalled(self, generated: str) -> bool:
        return generated.startswith(self.value + "'")


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


@functools.lru_cache(maxsize=8)
def _line_end_mask(tokenizer) -> torch.Tensor:
    """mask[id] is True when token ``id`` ends a line (so the next token starts one)."""
    return torch.tensor([tokenizer.decode([i]).endswith("\n") for i in range(len(tokenizer))])


def insert_needles(tokenizer, hay: torch.Tensor, needles: list[Needle], depths: list[float]) -> torch.Tensor:
    """``hay`` with each needle's line inserted at (the line start at or before) ``depth * len(hay)``."""
    line_end = _line_end_mask(tokenizer)
    pieces, cursor = [], 0
    for depth, needle in sorted(zip(depths, needles), key=lambda p: p[0]):
        pos = max(int(depth * len(hay)), cursor)
        lo = max(pos - SNAP_WINDOW, cursor)
        ends = torch.nonzero(line_end[hay[lo:pos]]).flatten()
        pos = lo + int(ends[-1]) + 1 if len(ends) else pos
        pieces += [hay[cursor:pos], _encode(tokenizer, needle.line)]
        cursor = pos
    return torch.cat(pieces + [hay[cursor:]])


def _hay(stream: torch.Tensor, rng: random.Random, length: int) -> torch.Tensor:
    if length > len(stream):
        raise ValueError(f"haystack of {length} tokens requested from a stream of {len(stream)}")
    start = rng.randrange(len(stream) - length + 1)
    return stream[start : start + length]


def needle_training_example(rng: random.Random, stream: torch.Tensor, tokenizer, length: int,
                            max_needles: int = 2, edge_prob: float = 0.0) -> torch.Tensor:
    """``length`` tokens: a window of ``stream`` holding 1..max_needles needles, then every query (shuffled) with
    its answer. Several needles per row give more retrieval targets per row: the answers are few tokens.
    A share ``edge_prob`` of needles sits exactly at the window's start or end, which uniform depths rarely hit.
    """
    return needle_training_row(rng, stream, tokenizer, length, max_needles, edge_prob)[0]


def needle_training_row(rng: random.Random, stream: torch.Tensor, tokenizer, length: int,
                        max_needles: int = 2, edge_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`needle_training_example` and a bool mask of its answer tokens (so training can weight them)."""
    needles = [Needle.random(rng) for _ in range(rng.randint(1, max_needles))]
    asked = rng.sample(needles, len(needles))
    pairs = [(_encode(tokenizer, n.query + n.answer), len(_encode(tokenizer, n.query))) for n in asked]
    tail = torch.cat([qa for qa, _ in pairs])
    tail_mask = torch.cat([torch.arange(len(qa)) >= q for qa, q in pairs])
    n_needle_tokens = sum(len(_encode(tokenizer, n.line)) for n in needles)
    hay = _hay(stream, rng, length - n_needle_tokens - len(tail))
    depths = [rng.choice((0.0, 1.0)) if edge_prob and rng.random() < edge_prob else rng.random() for _ in needles]
    body = insert_needles(tokenizer, hay, needles, depths)
    return torch.cat([body, tail]), torch.cat([torch.zeros(len(body), dtype=torch.bool), tail_mask])


def _haystack_prompt(tokenizer, stream, rng, length, needles, depths, query: Needle) -> torch.Tensor:
    """A prompt of exactly ``length`` tokens ending with ``query``'s question."""
    q = _encode(tokenizer, query.query)
    n_needle_tokens = sum(len(_encode(tokenizer, n.line)) for n in needles)
    hay = _hay(stream, rng, length - n_needle_tokens - len(q))
    return torch.cat([insert_needles(tokenizer, hay, needles, depths), q])


def _context_len(model, context_len):
    return context_len or int(model.config.max_position_embeddings)


def needle_recall(model, tokenizer, *, context_len: int | None = None,
                  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), n_per_depth: int = 4,
                  seed: int = 0, batch_size: int = 4, spec: str | None = None) -> dict:
    """Exact-match rate of single-needle recall at each depth (0 = start of the context, 1 = just before the
    question), with prompt + answer filling ``context_len`` (default: the model's maximum)."""
    context_len = _context_len(model, context_len)
    rng = random.Random(seed)
    stream = token_stream(tokenizer, "heldout", max_tokens=max(8 * context_len, 65536))
    cases = [(d, Needle.random(rng)) for d in depths for _ in range(n_per_depth)]
    prompts = torch.stack([
        _haystack_prompt(tokenizer, stream, rng, context_len - ANSWER_TOKENS, [n], [d], n) for d, n in cases
    ])
    generated = torch.cat([greedy_generate(model, tokenizer, b, ANSWER_TOKENS) for b in prompts.split(batch_size)])
    hits = [n.recalled(tokenizer.decode(row, skip_special_tokens=True)) for (_, n), row in zip(cases, generated)]
    by_depth = {str(d): sum(h for (dd, _), h in zip(cases, hits) if dd == d) / n_per_depth for d in depths}
    params = {"context_len": context_len, "depths": list(depths), "n_per_depth": n_per_depth, "seed": seed,
              "by_depth": by_depth, "format": Needle("NEEDLE_xxxxxx", "vvvvvvvv").line.strip()}
    return make_record(model, "needle_recall", sum(hits) / len(hits), spec=spec, params=params)


@torch.no_grad()
def multi_turn_recall(model, tokenizer, *, context_len: int | None = None, n_trials: int = 8, seed: int = 0,
                      spec: str | None = None) -> list[dict]:
    """Two needles; ask for one, then, over the same ``past_key_values`` (whatever cache ``generate`` built,
    so cache plugins are exercised), append the second question and decode again. Recall of each turn."""
    context_len = _context_len(model, context_len)
    rng = random.Random(seed)
    stream = token_stream(tokenizer, "heldout", max_tokens=max(8 * context_len, 65536))
    kwargs = dict(do_sample=False, max_new_tokens=ANSWER_TOKENS, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True)
    hits = {1: 0, 2: 0}
    for _ in range(n_trials):
        needles = [Needle.random(rng), Needle.random(rng)]
        second_q = _encode(tokenizer, needles[1].query)
        length = context_len - 2 * ANSWER_TOKENS - len(second_q)
        depths = [rng.uniform(0.05, 0.45), rng.uniform(0.55, 0.95)]
        prompt = _haystack_prompt(tokenizer, stream, rng, length, needles, depths, needles[0])[None].to(model.device)
        # stop the first answer at its line end, so the second question follows it as in training
        first = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), stop_strings="\n",
                               tokenizer=tokenizer, **kwargs)
        turn2 = torch.cat([first.sequences, second_q[None].to(model.device)], dim=1)
        second = model.generate(input_ids=turn2, attention_mask=torch.ones_like(turn2),
                                **{cache_kwarg(model): output_cache(first)}, **kwargs)
        for turn, out, start, needle in ((1, first, prompt.shape[1], needles[0]),
                                         (2, second, turn2.shape[1], needles[1])):
            answer = tokenizer.decode(out.sequences[0, start:], skip_special_tokens=True)
            hits[turn] += needle.recalled(answer)
    params = {"context_len": context_len, "n_trials": n_trials, "seed": seed}
    return [make_record(model, f"multi_turn_recall_turn{t}", hits[t] / n_trials, spec=spec, params=params)
            for t in (1, 2)]
