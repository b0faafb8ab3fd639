"""diffusers integration: `accel=` on `DiffusionPipeline.from_pretrained` and `ModelMixin.from_pretrained`."""

from __future__ import annotations

import functools

from ..apply import apply, get_config
from ..config import AccelConfig


def _wrap(original):
    @functools.wraps(original)
    def from_pretrained(cls, *args, accel=None, **kwargs):
        requested = AccelConfig.from_spec(accel) if accel is not None else None
        obj = original(cls, *args, **kwargs)
        if requested:
            have = get_config(obj).names
            missing = [p for p in requested.plugins if p.name not in have]
            if missing:
                apply(obj, missing)
        return obj

    return from_pretrained


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from diffusers import DiffusionPipeline, ModelMixin

    DiffusionPipeline.from_pretrained = classmethod(_wrap(DiffusionPipeline.from_pretrained.__func__))
    ModelMixin.from_pretrained = classmethod(_wrap(ModelMixin.from_pretrained.__func__))
    _installed = True
