"""Speculative decoding plugins: lossless, batched `generate()` and `pipeline()`.

    model = AutoModelForCausalLM.from_pretrained(target_id, accel="draft(draft='path/to/draft', k=4)")
    model = AutoModelForCausalLM.from_pretrained(target_id, accel="selfdraft(k=4, adaptive=True)")
    pipe = pipeline("text-generation", model=target_id, accel="lookup(k=8)")   # or "recycle(k=4)"
    model = AutoModelForCausalLM.from_pretrained(target_id, accel="fast+draft(draft='path/to/draft', k=4)")
    model.generate(**batch_of_left_padded_prompts)   # any batch size; greedy or sampling
    model.hf_accel_spec_stats["mean_accepted"]       # drafts kept per row and verify step, last call

| plugin | drafts with |
| --- | --- |
| `draft` | a smaller model with the same tokenizer (`draft=` a model id or path, loaded with from_pretrained) |
| `selfdraft` | an int8 copy of the target itself (hf_accel's `int8` plugin on a deepcopy; nothing to download) |
| `lookup` | n-grams of the row's own prompt and output (prompt lookup decoding) |
| `recycle` | an adjacency table of the target's own top-1 candidates from earlier verify steps (Token Recycling) |
| `medusa` | Medusa heads on the target's last hidden state; a static tree of their top-k candidates (`medusa.py`) |

Every plugin keeps the target's output: greedy output is token-identical to the target alone, sampled output has
the target's distribution (exact rejection sampling). `adaptive=True` picks the draft length per round from the
measured acceptance rate (k is then the upper bound). Batches: rows accept different numbers of tokens; each row has
its own KV length, mask and positions (`rows.py`), so transformers' batch-size-1 limit does not apply.

With `fast` in the spec (`fast+draft(...)`, `fast+selfdraft`, `fast+lookup`, `fast+recycle`, `fast+medusa(...)`)
the target verifies on the fast runtime: static KV cache, per-row slots, each Q-token forward one CUDA graph
(compiled) on the GPU; a draft model drafts on a companion runtime of its own; Medusa's tree verifies in one graph
per tree (positions by depth, ancestor mask, hidden states out) and its accepted path's K/V moves to contiguous
slots in another. Drafters and the verification rule are the same code; only the "forward Q tokens / roll back"
backend differs (`backends.py`). `model.hf_accel_spec_stats["runtime"]` says which ran. A call the runtime cannot
serve (e.g. a KV plugin's layers without per-row slots at batch > 1, or, for Medusa, without `move_slots`) uses
the eager cache, with one warning per reason; a call speculative decoding cannot serve (repetition penalty, beam
search, ...) goes to the runtime's own loop.

With a KV plugin (`fast+sink+draft(...)`, `fast+snapkv+lookup`, `fast+kvquant+...` at batch 1) the verify
forwards run on the plugin's own runtime layers, and the output is the model-with-that-plugin's, token for token
(the first verify takes the prompt's last logits and K/V from the prefill, as the plugin alone does). The loop's
own eager cache never stands in for a plugin's: without `fast`, or for a plugin the runtime cannot serve per row
(h2o, adakv, duo, quest, kvquant at batch > 1), the call runs without speculation, with a warning.

Design: `decode.py` (the loop, chain and tree verification, drafters), `rows.py` (per-row KV slots and tree masks),
`backends.py` (where a model's per-row KV lives: `rows.py`'s eager cache or a fast-runtime session), `generate.py`
(`install`: the `custom_generate` wrapper recorded by the Patcher, so `hf_accel.remove(model)` restores `generate`),
`medusa.py` (heads, training, artifact, the tree drafter).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from hf_accel.errors import OptionError, UnsupportedModelError
from hf_accel.plugin import Family, Plugin

from .decode import DraftLength, LookupDrafter, ModelDrafter, RecycleDrafter
from .generate import STATS_ATTR, install

__all__ = ["DraftModel", "Lookup", "Recycle", "SelfDraft"]

DRAFT_FREE_COST = 0.05  # drafting is free; each extra verified token still costs a little of a target step


@dataclass
class _Speculative(Plugin):
    family = Family.SPECULATIVE
    conflicts_with = ("family:speculative",)

    k: int = 4  # tokens drafted per verify step (the upper bound with adaptive=True)
    adaptive: bool = False  # choose k each round from the measured acceptance rate

    def __post_init__(self):
        if not 1 <= self.k <= 64:
            raise OptionError(f"plugin {self.name!r}: option 'k' must be in [1, 64], got {self.k}")

    def check(self, model):
        super().check(model)
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"plugin {self.name!r} runs decoder-only models; "
                                        f"{type(model).__name__} is an encoder-decoder model")

    def make_drafter(self, model):
        """(drafter factory `(batch, sampler, open_rows) -> drafter`, cost of one draft step relative to one verify
        step); `open_rows` gives a draft model its per-row KV (backends.py)."""
        raise NotImplementedError

    def apply(self, model, patcher):
        make_drafter, draft_cost = self.make_drafter(model)
        install(model, patcher, self.name, make_drafter, DraftLength(self.k, self.adaptive, draft_cost))

    def card_metadata(self, model):
        return {"speculative": self.name, "draft_length": self.k, "adaptive_draft_length": self.adaptive}


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _model_drafter(draft, target):
    def make(batch, sampler, open_rows):
        if draft.device != batch.seq.device:  # the target moved after apply(); follow it
            draft.to(batch.seq.device)
        return ModelDrafter(draft, batch, sampler, open_rows)

    # memory-bound decoding: a step costs about the bytes it reads
    return make, _param_bytes(draft) / _param_bytes(target)


@dataclass
class DraftModel(_Speculative):
    """Speculative decoding with a smaller draft model (same tokenizer); lossless, any batch size."""

    name = "draft"
    draft: str = ""  # model id or local path of the draft model

    def __post_init__(self):
        super().__post_init__()
        if not self.draft:
            raise OptionError("plugin 'draft' needs option 'draft': a model id or path with the target's tokenizer, "
                              "e.g. draft(draft='org/small-model', k=4)")

    def make_drafter(self, model):
        from transformers import AutoModelForCausalLM

        draft = AutoModelForCausalLM.from_pretrained(self.draft, dtype=model.dtype).to(model.device).eval()
        _check_vocab(model, draft)
        return _model_drafter(draft, model)


def _check_vocab(target, draft) -> None:
    tv, dv = target.get_output_embeddings().weight.shape[0], draft.get_output_embeddings().weight.shape[0]
    if tv != dv:
        raise UnsupportedModelError(f"plugin 'draft': the draft model scores {dv} token ids and the target {tv}; "
                                    "a draft must share the target's tokenizer and vocabulary size")


@dataclass
class SelfDraft(_Speculative):
    """Self-speculation: an int8 weight-only copy of the target drafts for it (no second model to download)."""

    name = "selfdraft"
    conflicts_with = ("family:speculative", "family:quantization", "family:compression")

    def make_drafter(self, model):
        import hf_accel

        # Copy the module tree only: hf_accel state, patched methods and runtimes stay with the target.
        skip = {k: v for k, v in vars(model).items() if k.startswith("_hf_accel") or k in ("generate", STATS_ATTR)}
        draft = copy.deepcopy(model, memo={id(v): None for v in skip.values()})
        for key in skip:
            vars(draft).pop(key, None)
        hf_accel.apply(draft, "int8")
        return _model_drafter(draft.eval(), model)


@dataclass
class Lookup(_Speculative):
    """Prompt lookup decoding: drafts copied from n-gram matches in the row's own prompt and output."""

    name = "lookup"
    k: int = 8
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise OptionError(f"plugin 'lookup': need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, "
                              f"{self.ngram_max}")

    def make_drafter(self, model):
        drafter = LookupDrafter(self.ngram_max, self.ngram_min)
        return (lambda batch, sampler, open_rows: drafter), DRAFT_FREE_COST


@dataclass
class Recycle(_Speculative):
    """Token Recycling: drafts from an adjacency table of the target's own earlier top candidates (train-free)."""

    name = "recycle"

    def make_drafter(self, model):
        vocab = model.get_output_embeddings().weight.shape[0]
        table = torch.zeros(vocab, dtype=torch.long, device=model.device)
        drafter = RecycleDrafter(table)

        def make(batch, sampler, open_rows):
            if drafter.table.device != batch.seq.device:
                drafter.table = drafter.table.to(batch.seq.device)
            return drafter

        return make, DRAFT_FREE_COST
