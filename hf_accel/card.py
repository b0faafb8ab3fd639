"""Model cards for hf_accel artifacts, rendered from `model_cards/*.j2` through huggingface_hub's ModelCard.

The card's YAML front matter carries the spec and the measured metrics (`hf_accel:` key), so `hf-accel card DIR`
can re-render a card without losing measurements, and `tags: [hf_accel, ...]` makes artifacts searchable."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from . import options as opts
from .apply import get_config
from .artifacts import QUANT_METHOD
from .registry import registry
from .version import __version__

METRICS_ATTR = "_hf_accel_metrics"


def record_metric(model: Any, record: dict) -> None:
    """Attach a measured record (from the quality harness or a benchmark) so the next save puts it on the card."""
    records = getattr(model, METRICS_ATTR, None)
    if records is None:
        records = []
        setattr(model, METRICS_ATTR, records)
    records.append(dict(record))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "diffusers", "huggingface_hub", "safetensors", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _template() -> str:
    return resources.files("hf_accel.model_cards").joinpath("model_card.md.j2").read_text()


def _existing_metrics(directory: Path) -> list[dict]:
    try:
        data = ModelCard.load(directory / "README.md").data.to_dict()
    except Exception:
        return []
    return list((data.get("hf_accel") or {}).get("metrics") or [])


def render_card(model: Any, directory: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """Render the card of an artifact saved in `directory` (model is the live model, or None for an existing
    folder whose config.json holds the spec)."""
    directory = Path(directory)
    config_json = json.loads((directory / "config.json").read_text())
    qc = config_json.get("quantization_config") or {}
    if model is not None:
        spec = get_config(model)
        base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        architecture = type(model).__name__
    else:
        from .config import AccelConfig

        spec = AccelConfig.from_dict({"format_version": qc.get("format_version", 1), "plugins": qc.get("plugins", [])})
        base_model = qc.get("base_model")
        architecture = (config_json.get("architectures") or ["?"])[0]
    if base_model and os.path.isdir(str(base_model)):
        base_model = None  # a local path means nothing to a reader of the Hub page

    plugins = []
    for p in spec.plugins:
        info = registry.get(p.name)
        plugins.append(
            {
                "name": p.name,
                "family": p.family.value,
                "version": info.version,
                "distribution": info.distribution,
                "options": json.dumps(opts.as_dict(p)),
                "summary": type(p).summary(),
            }
        )
    metrics = _existing_metrics(directory) + list(getattr(model, METRICS_ATTR, []) or [])
    files = [{"name": k, **v} for k, v in (qc.get("checksums") or {}).items()]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        tags=["hf_accel", *[f"hf_accel-{p.name}" for p in spec.plugins]],
        hf_accel={"version": __version__, "spec": spec.to_string(), "config": spec.to_dict(), "metrics": metrics},
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template(),
        title=f"{(base_model or architecture).split('/')[-1]} + hf_accel `{spec.to_string()}`",
        base_model=base_model,
        architecture=architecture,
        auto_class="AutoModelForCausalLM" if "CausalLM" in architecture or "LMHead" in architecture else "AutoModel",
        repo_id=repo_id or "path/or/repo-id",
        spec=spec.to_string(),
        plugins=plugins,
        files=files,
        metrics=metrics,
        hf_accel_version=__version__,
        versions=", ".join(f"{k} {v}" for k, v in library_versions().items()),
        quant_method=QUANT_METHOD,
    )
