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
DIFFUSERS_KEY = "_hf_accel"  # the spec's key in diffusers configs (hf_accel.diffusers_models.CONFIG_KEY)


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


def _card_data(library_name: str, base_model: str | None, spec, metrics: list[dict]) -> ModelCardData:
    """Front matter: the spec and metrics under `hf_accel:` (read back by `hf-accel card`), tags for search."""
    return ModelCardData(
        base_model=base_model,
        library_name=library_name,
        tags=["hf_accel", *[f"hf_accel-{p.name}" for p in spec.plugins]],
        hf_accel={"version": __version__, "spec": spec.to_string(), "config": spec.to_dict(), "metrics": metrics},
    )


def _template(name: str = "model_card.md.j2") -> str:
    return resources.files("hf_accel.model_cards").joinpath(name).read_text()


def _existing_metrics(directory: Path) -> list[dict]:
    try:
        data = ModelCard.load(directory / "README.md").data.to_dict()
    except Exception:
        return []
    return list((data.get("hf_accel") or {}).get("metrics") or [])


def render_card(model: Any, directory: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """Render the card of an artifact saved in `directory` (model is the live model, or None for an existing
    folder whose config.json holds the spec). Diffusers folders (a pipeline, or one component) get the diffusers card."""
    directory = Path(directory)
    diffusers_facts = _diffusers_folder(directory)
    if diffusers_facts is not None:
        return _render_diffusers_card(model, directory, repo_id, diffusers_facts)
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

    plugins = _plugin_rows(spec)
    metrics = _existing_metrics(directory) + list(getattr(model, METRICS_ATTR, []) or [])
    files = [{"name": k, **v} for k, v in (qc.get("checksums") or {}).items()]
    card_data = _card_data("transformers", base_model, spec, metrics)
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


def _plugin_rows(spec) -> list[dict[str, Any]]:
    rows = []
    for p in spec.plugins:
        info = registry.get(p.name)
        rows.append(
            {
                "name": p.name,
                "family": p.family.value,
                "version": info.version,
                "distribution": info.distribution,
                "options": json.dumps(opts.as_dict(p)),
                "summary": type(p).summary(),
            }
        )
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _diffusers_folder(directory: Path) -> dict | None:
    """What a diffusers artifact folder records (JSON only, no diffusers import): a pipeline (model_index.json) with
    its accelerated components, or a single component whose config.json has the spec. None otherwise."""
    index = _read_json(directory / "model_index.json")
    if index is not None:
        components = []
        for name, value in index.items():
            config = _read_json(directory / name / "config.json") if isinstance(value, list) else None
            if config is not None and isinstance(config.get(DIFFUSERS_KEY), dict):
                components.append((name, config))
        return {"pipeline": index.get("_class_name", "DiffusionPipeline"), "index": index, "components": components}
    config = _read_json(directory / "config.json")
    if config is not None and isinstance(config.get(DIFFUSERS_KEY), dict) and "_diffusers_version" in config:
        return {"pipeline": None, "index": {}, "components": [("", config)]}
    return None


def _base_class_name(config: dict) -> str:
    name = str(config.get("_class_name", "?"))
    return name[len("Accel"):] if name.startswith("Accel") else name


def _render_diffusers_card(model: Any, directory: Path, repo_id: str | None, facts: dict) -> ModelCard:
    from .config import AccelConfig

    records = [facts["index"].get(DIFFUSERS_KEY) or {}] + [config[DIFFUSERS_KEY] for _, config in facts["components"]]
    if model is not None:
        spec = get_config(model)
        base_model = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    else:
        spec = AccelConfig.from_dict({"plugins": [p for r in records for p in r.get("plugins") or []]})
        try:
            base_model = ModelCard.load(directory / "README.md").data.base_model
        except Exception:
            base_model = None
    if base_model and os.path.isdir(str(base_model)):
        base_model = None  # a local path means nothing to a reader of the Hub page
    components = [{"name": name or ".", "architecture": _base_class_name(config)} for name, config in facts["components"]]
    files = [
        {"name": f"{name}/{file}" if name else file, **checksum}
        for name, config in facts["components"]
        for file, checksum in (config[DIFFUSERS_KEY].get("checksums") or {}).items()
    ]
    architecture = facts["pipeline"] or (components[0]["architecture"] if components else "?")
    metrics = _existing_metrics(directory) + list(getattr(model, METRICS_ATTR, []) or [])
    card_data = _card_data("diffusers", base_model, spec, metrics)
    return ModelCard.from_template(
        card_data,
        template_str=_template("diffusers_card.md.j2"),
        title=f"{(base_model or architecture).split('/')[-1]} + hf_accel `{spec.to_string()}`",
        base_model=base_model,
        architecture=architecture,
        is_pipeline=facts["pipeline"] is not None,
        components=components,
        repo_id=repo_id or "path/or/repo-id",
        spec=spec.to_string(),
        plugins=_plugin_rows(spec),
        files=files,
        metrics=metrics,
        hf_accel_version=__version__,
        versions=", ".join(f"{k} {v}" for k, v in library_versions().items()),
    )
