"""Plain JSON-able result records: every number the harness produces carries its provenance."""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable


def versions() -> dict:
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "tokenizers", "huggingface_hub", "hf_accel"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import torch

    out["cuda"] = torch.version.cuda
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return out


def current_command() -> str:
    return shlex.join(["python", *sys.argv])


def model_name(model) -> str:
    return str(getattr(model.config, "name_or_path", "") or type(model).__name__)


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers, so json.dumps never fails."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def make_record(model, metric: str, value, *, spec: str | None = None, params: dict | None = None,
                command: str | None = None) -> dict:
    """``model`` is a model object or a name; ``params`` holds the measurement's settings."""
    return {
        "model": model if isinstance(model, str) else model_name(model),
        "spec": spec,
        "metric": metric,
        "value": _plain(value),
        "params": _plain(params or {}),
        "command": command or current_command(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def by_metric(records: Iterable[dict]) -> dict:
    """{metric: value} view of a list of records."""
    return {r["metric"]: r["value"] for r in records}


def save_records(path, records: list[dict]) -> None:
    Path(path).write_text(json.dumps(records, indent=2) + "\n")
