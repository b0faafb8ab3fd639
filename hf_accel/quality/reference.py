"""Loading the project's reference models: ``tiny`` ships as package data, the others are built once per machine."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AccelError

ASSETS = Path(__file__).parent / "assets"
BUILT_NAMES = ("small", "base", "draft", "qwen2-small")


class ReferenceModelMissing(FileNotFoundError, AccelError):  # catchable as either
    """A reference model that is built locally has not been built yet."""


def reference_home() -> Path:
    """``$HF_ACCEL_HOME/reference`` or ``~/.cache/hf_accel/reference``."""
    home = os.environ.get("HF_ACCEL_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "hf_accel") / "reference"


def reference_path(name: str) -> Path:
    if name == "tiny":
        return ASSETS / "tiny"
    if name not in BUILT_NAMES:
        raise AccelError(f"unknown reference model {name!r}; known: tiny, {', '.join(BUILT_NAMES)}")
    path = reference_home() / name
    if not (path / "config.json").is_file():
        raise ReferenceModelMissing(
            f"reference model {name!r} is not built at {path}. Build it with:\n"
            f"  python scripts/build_reference.py --model {name} --out {path} --device cuda"
        )
    return path


def load_reference(name: str = "tiny", *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a reference model, in eval mode; ``model.name_or_path`` is ``reference/<name>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = reference_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.config.name_or_path = f"reference/{name}"
    return model, tokenizer
