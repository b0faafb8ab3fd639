"""diffusers integration: `accel=` on `DiffusionPipeline.from_pretrained` and `ModelMixin.from_pretrained`, and
pipelines and models that save, push and reload as hf_accel artifacts.

- An accelerated diffusers model becomes an instance of `hf_accel.diffusers_models.Accel<Class>` (a subclass, so
  `isinstance` checks hold); its config carries the spec. The class is swapped back when `remove()` empties the state.
  Saving writes that class name into model_index.json and config.json (see `hf_accel.diffusers_models`).
- Plugins applied to the pipeline itself (DIFFUSION_PIPELINE) are recorded under `_hf_accel` in model_index.json and
  re-applied by `DiffusionPipeline.from_pretrained`.
- `save_pretrained` / `push_to_hub` of an accelerated pipeline write the hf_accel card at the pipeline root; diffusers'
  `push_to_hub` would overwrite it with a generic one, so accelerated objects are pushed through `artifacts`.
- `UNet2DModel.from_pretrained(artifact)` (the plain class) hands over to the artifact's Accel class.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline, ModelMixin

from .. import artifacts
from .. import diffusers_models as components
from ..apply import AccelState, _on_applied, apply, get_config
from ..config import AccelConfig
from ..errors import AccelError

CONFIG_KEY = components.CONFIG_KEY


def _set_config_key(obj: Any, key: str, value: Any) -> None:
    """Set or drop one entry of a diffusers config (a FrozenDict; register_to_config can only add)."""
    config = dict(obj._internal_dict)
    if value is None:
        config.pop(key, None)
    else:
        config[key] = value
    obj._internal_dict = type(obj._internal_dict)(config)


def _on_model_changed(target: Any, state: AccelState) -> None:
    """Keep the class and config of a diffusers object equal to what is applied, so save_pretrained writes it."""
    record = components.spec_record(state.config) if state.applied else None
    if isinstance(target, DiffusionPipeline):
        _set_config_key(target, CONFIG_KEY, record)
    elif isinstance(target, ModelMixin):
        if record is not None and not isinstance(target, components.AccelComponent):
            target.__class__ = components.accel_class(type(target))
        elif record is None and isinstance(target, components.AccelComponent):
            target.__class__ = type(target)._accel_base
        _set_config_key(target, CONFIG_KEY, record)


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in components.HUB_KEYS if k in kwargs}


def _apply_missing(obj: Any, plugins) -> None:
    have = get_config(obj).names
    missing = [p for p in plugins if p.name not in have]
    if missing:
        apply(obj, missing)


def _wrap_model_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, accel=None, **kwargs):
        requested = AccelConfig.from_spec(accel) if accel is not None else None  # bad specs fail before loading
        if pretrained_model_name_or_path is not None:
            try:
                config = cls.load_config(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
            except Exception:
                config = None  # not loadable as a config: diffusers raises its own error below
            accel_cls = components.artifact_class(config) if isinstance(config, dict) else None
            if accel_cls is not None:  # an artifact loaded through the plain class: its own class restores it
                return accel_cls.from_pretrained(pretrained_model_name_or_path, *args, accel=accel, **kwargs)
        model = original(cls, pretrained_model_name_or_path, *args, **kwargs)
        if requested:
            _apply_missing(model, requested.plugins)
        return model

    return from_pretrained


def _wrap_pipeline_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, accel=None, **kwargs):
        requested = AccelConfig.from_spec(accel) if accel is not None else None
        saved = AccelConfig()
        try:
            index = cls.load_config(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
        except Exception:
            index = None  # diffusers raises its own error below
        if isinstance(index, dict) and isinstance(index.get(CONFIG_KEY), dict):  # plugins of the pipeline itself
            saved = components.restore_spec(index[CONFIG_KEY], str(pretrained_model_name_or_path))
        pipe = original(cls, pretrained_model_name_or_path, *args, **kwargs)
        # the components restored their own specs while loading; the pipeline's, then accel=, come on top
        _apply_missing(pipe, [*saved.plugins, *(requested.plugins if requested else ())])
        return pipe

    return from_pretrained


def _refresh_component_entries(pipe: DiffusionPipeline) -> None:
    """model_index.json records each component's class when it is registered; an apply or remove since then may
    have changed the class of a model, so register the models again (diffusers' public way to update the entry)."""
    for name, value in dict(pipe.config).items():
        component = getattr(pipe, name, None) if isinstance(value, (list, tuple)) else None
        if isinstance(component, ModelMixin):
            pipe.register_modules(**{name: component})


def _wrap_pipeline_save(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        _refresh_component_entries(self)
        if not get_config(self):
            return original(self, save_directory, *args, **kwargs)
        options = signature.bind(self, save_directory, *args, **kwargs)
        options.apply_defaults()
        a = dict(options.arguments)
        a.pop("self")
        push, extra = a.pop("push_to_hub"), a.pop("kwargs", {})
        token = components.in_pipeline_save.set(True)
        try:
            original(self, **a)
        finally:
            components.in_pipeline_save.reset(token)
        from ..card import render_card

        render_card(self, save_directory).save(Path(save_directory) / "README.md")
        if push:
            artifacts.push_folder(save_directory, extra.get("repo_id", Path(save_directory).name), token=extra.get("token"),
                                  private=extra.get("private"), commit_message=extra.get("commit_message"),
                                  create_pr=extra.get("create_pr", False))

    return save_pretrained


def _wrap_push_to_hub(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def push_to_hub(self, repo_id, *args, **kwargs):
        if not get_config(self):
            return original(self, repo_id, *args, **kwargs)
        options = signature.bind(self, repo_id, *args, **kwargs)
        options.apply_defaults()
        a = options.arguments
        if a.get("subfolder"):
            raise AccelError("push_to_hub(subfolder=) is not supported for hf_accel artifacts; push the whole pipeline or model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=a.get("safe_serialization", True), variant=a.get("variant"))
            return artifacts.push_folder(tmp, repo_id, token=a.get("token"), private=a.get("private"),
                                         commit_message=a.get("commit_message"), create_pr=a.get("create_pr", False))

    return push_to_hub


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from diffusers.pipelines import pipeline_loading_utils

    # Downloads from the Hub accept a component library only if diffusers lists it or the repo ships `<lib>.py`.
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(components.__name__, {"ModelMixin": ["save_pretrained", "from_pretrained"]})
    DiffusionPipeline.from_pretrained = classmethod(_wrap_pipeline_from_pretrained(DiffusionPipeline.from_pretrained.__func__))
    ModelMixin.from_pretrained = classmethod(_wrap_model_from_pretrained(ModelMixin.from_pretrained.__func__))
    DiffusionPipeline.save_pretrained = _wrap_pipeline_save(DiffusionPipeline.save_pretrained)
    DiffusionPipeline.push_to_hub = _wrap_push_to_hub(DiffusionPipeline.push_to_hub)
    ModelMixin.push_to_hub = _wrap_push_to_hub(ModelMixin.push_to_hub)
    _on_applied.append(_on_model_changed)
    _installed = True
