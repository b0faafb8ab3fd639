"""Byte-level BPE tokenizer for the reference models, trained on the corpus' train split."""
from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
QWEN2_UNK = "<|endoftext|>"
# Qwen2Tokenizer's pre-tokenization (transformers' models/qwen2/tokenization_qwen2.py).
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")
STYLES = ("gpt2", "qwen2")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, style: str = "gpt2") -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (any byte string round-trips).

    style "gpt2": GPT-2's byte-level pre-tokenization. style "qwen2": Qwen2's pipeline (NFC, its split regex, then
    byte-level) and an `<|endoftext|>` unk token. transformers 5 loads a checkpoint whose config says `qwen2` with
    Qwen2Tokenizer whatever tokenizer_config.json declares, and that class rebuilds the pipeline from vocab and
    merges; a tokenizer trained with the same pipeline and tokens is then loaded exactly as it was trained.
    """
    if style not in STYLES:
        raise ValueError(f"train_tokenizer: style must be one of {STYLES}, got {style!r}")
    tok = Tokenizer(models.BPE())
    specials = [PAD, BOS, EOS]  # ids 0, 1, 2
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials.append(QWEN2_UNK)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No post-processor: nothing is added implicitly; documents are joined with EOS by the caller.
    extra = {"unk_token": QWEN2_UNK} if style == "qwen2" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 30, **extra
    )
