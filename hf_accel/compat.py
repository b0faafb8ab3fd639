"""Differences between the transformers releases hf_accel supports (5.17 on the GPU image … the newest).

transformers 5.24 renamed the cache argument of `forward` and `generate` from ``past_key_values`` to ``cache``
(the old name is deprecated until 5.40, with a FutureWarning per call). Code that passes or reads the cache goes
through these helpers so that it speaks whichever name the installed release uses.
"""
from __future__ import annotations

import inspect

CACHE_NAMES = ("cache", "past_key_values")  # new name first


_CACHE_KWARG: dict[type, str] = {}  # a plain dict, not lru_cache: torch.compile traces through this function


def cache_kwarg(model) -> str:
    """The keyword under which `model.forward` / `model.generate` take the KV cache."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        try:
            takes_cache = "cache" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        _CACHE_KWARG[cls] = "cache" if takes_cache else "past_key_values"
    return _CACHE_KWARG[cls]


def get_cache(kwargs: dict):
    """The cache passed in ``kwargs`` under either name (None when there is none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output):
    """The cache a model or `generate` output carries, under either name."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None) if not isinstance(output, dict) else output.get(name)
        if value is not None:
            return value
    return None
