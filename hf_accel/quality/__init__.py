"""Quality harness: what a lossy plugin costs, measured on reference models trained on the Python stdlib.

Every function takes models and a tokenizer and returns JSON-able records (see :mod:`.records`).
"""
from .agreement import greedy_agreement
from .corpus import corpus_stats, count_tokens, iter_texts, source_files, token_stream
from .needle import Needle, multi_turn_recall, needle_recall
from .perplexity import perplexity, perplexity_change, unigram_perplexity
from .records import by_metric, make_record, save_records, versions
from .reference import ReferenceModelMissing, load_reference, reference_home
from .tokenizer import train_tokenizer

__all__ = [
    "Needle", "ReferenceModelMissing", "by_metric", "corpus_stats", "count_tokens", "greedy_agreement",
    "iter_texts", "load_reference", "make_record", "multi_turn_recall", "needle_recall", "perplexity",
    "perplexity_change", "reference_home", "save_records", "source_files", "token_stream", "train_tokenizer",
    "unigram_perplexity", "versions",
]
