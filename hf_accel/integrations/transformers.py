"""transformers integration: `accel=` on every `from_pretrained`, artifacts that reload as they were saved.

- `AccelQuantizationConfig` / `AccelHfQuantizer` are registered as the quantization method "hf_accel": the spec
  rides in `config.json` as `quantization_config`, and on reload transformers calls our quantizer, which rebuilds
  rewritten weights before they load and re-applies the runtime plugins afterwards.
- `PreTrainedModel.from_pretrained` (which every Auto class ends in) takes `accel=`; `save_pretrained` and
  `push_to_hub` of an accelerated model write an hf_accel artifact (`hf_accel.artifacts`).
- `transformers.pipeline(..., accel=)` applies the spec to the pipeline's model, so `accel` never reaches the
  tokenizer or processor kwargs.
- transformers only *warns* about an unknown quantization method and would load rewritten weights as floats, so an
  artifact carries a load guard (see `artifacts.GUARD_MESSAGE`); the `PreTrainedConfig.from_dict` patch here lifts
  it when hf_accel is imported.
"""

from __future__ import annotations

import functools
from typing import Any

import transformers
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import artifacts
from ..apply import AccelState, _on_applied, apply, get_config
from ..config import FORMAT_VERSION, AccelConfig
from ..distributed import TP_LOADING, localize, prepare_tp_plan, tp_size_requested
from ..errors import AccelError, ArtifactError, ConflictError
from ..version import __version__

try:  # transformers 5 spells it PreTrainedConfig; keep the 4.x alias working
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as PreTrainedConfig

QUANT_METHOD = artifacts.QUANT_METHOD


class AccelQuantizationConfig(QuantizationConfigMixin):
    """The serialised accel spec inside `config.json` (`quantization_config`)."""

    def __init__(self, plugins=None, format_version=FORMAT_VERSION, hf_accel_version=None, **extra: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.plugins = plugins or []
        self.hf_accel_version = hf_accel_version or __version__
        for key, value in extra.items():  # checksums, guard: written by artifacts.finalize
            setattr(self, key, value)

    @classmethod
    def from_accel(cls, config: AccelConfig) -> "AccelQuantizationConfig":
        return cls(**config.to_dict())

    def accel_config(self) -> AccelConfig:
        try:
            return AccelConfig.from_dict({"format_version": self.format_version, "plugins": self.plugins})
        except AccelError as e:
            raise ArtifactError(f"cannot restore this hf_accel artifact (saved by hf_accel {self.hf_accel_version}): {e}") from None

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class AccelHfQuantizer(HfQuantizer):
    """Restores an artifact: rewritten weights are rebuilt before loading, other plugins applied after."""

    requires_calibration = False

    def __init__(self, quantization_config: AccelQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.accel = quantization_config.accel_config()  # fails early, before any weight is read

    def validate_environment(self, *args, **kwargs):
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        weight_plugins = [p for p in self.accel.plugins if p.rewrites_weights]
        if self.pre_quantized and weight_plugins:
            apply(model, list(weight_plugins), loading=True)
            prepare_tp_plan(model)  # tp_plan="auto": each rank loads its slice of the rewritten tensors
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        done = set(get_config(model).names)
        rest = [p for p in self.accel.plugins if p.name not in done]
        if rest:
            apply(model, rest)
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return True


def _on_model_changed(model: Any, state: AccelState) -> None:
    """Keep `model.config.quantization_config` equal to what is applied, so save_pretrained writes the spec."""
    if not isinstance(model, PreTrainedModel):
        return
    if state.applied:
        model.config.quantization_config = AccelQuantizationConfig.from_accel(state.config)
    elif isinstance(getattr(model.config, "quantization_config", None), AccelQuantizationConfig):
        del model.config.quantization_config
    if state.config.rewrites_weights:
        if getattr(model, "hf_quantizer", None) is None:
            model.hf_quantizer = AccelHfQuantizer(model.config.quantization_config, pre_quantized=True)
        model.is_quantized = True
    elif isinstance(getattr(model, "hf_quantizer", None), AccelHfQuantizer):
        model.hf_quantizer = None
        model.is_quantized = False


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
    return {k: kwargs[k] for k in keys if k in kwargs}


def _wrap_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, accel=None, **kwargs):
        requested = AccelConfig.from_spec(accel) if accel is not None else None  # bad specs fail before loading
        foreign = kwargs.get("quantization_config")
        if requested and foreign is not None and not isinstance(foreign, AccelQuantizationConfig):
            raise ConflictError(
                f"accel={requested.to_string()!r} cannot be combined with quantization_config="
                f"{type(foreign).__name__}: a model carries one quantization config, and hf_accel plugins own the "
                "weights and the saved spec. Drop quantization_config and use an hf_accel quantization plugin "
                "(see `hf-accel list`), or drop accel="
            )
        if pretrained_model_name_or_path is not None:
            artifacts.verify_transformers_artifact(pretrained_model_name_or_path, _hub_kwargs(kwargs))
        token = TP_LOADING.set(tp_size_requested(kwargs))
        try:
            model = original(cls, pretrained_model_name_or_path, *args, **kwargs)
        finally:
            TP_LOADING.reset(token)
        if (requested or get_config(model)) and getattr(model, "_tp_size", None) and model._tp_size > 1:
            localize(model)  # tp_plan=: our layers run on plain local shards (see hf_accel.distributed)
        if requested:
            have = get_config(model).names
            missing = [p for p in requested.plugins if p.name not in have]
            if missing:
                apply(model, missing)
        return model

    return from_pretrained


def _wrap_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        result = original(self, save_directory, *args, **kwargs)
        if get_config(self) and kwargs.get("is_main_process", True):
            artifacts.finalize(self, save_directory)
        return result

    return save_pretrained


def _wrap_push_to_hub(original):
    @functools.wraps(original)
    def push_to_hub(self, repo_id, *args, **kwargs):
        if not get_config(self):
            return original(self, repo_id, *args, **kwargs)
        # transformers' push_to_hub overwrites README.md with a generic card; ours carries the spec and metrics.
        return artifacts.push_to_hub(self, repo_id, **kwargs)

    return push_to_hub


def _wrap_pipeline(original):
    @functools.wraps(original)
    def pipeline(*args, accel=None, **kwargs):
        model_kwargs = dict(kwargs.get("model_kwargs") or {})
        if "accel" in model_kwargs:  # never let it reach tokenizer/processor loading
            if accel is not None:
                raise AccelError("give accel= once: either to pipeline() or inside model_kwargs, not both")
            accel = model_kwargs.pop("accel")
            kwargs["model_kwargs"] = model_kwargs
        requested = AccelConfig.from_spec(accel) if accel is not None else None
        pipe = original(*args, **kwargs)
        if requested:
            have = get_config(pipe.model).names
            missing = [p for p in requested.plugins if p.name not in have]
            if missing:
                apply(pipe.model, missing)
        return pipe

    return pipeline


def _wrap_get_config_dict(original):
    # Lift the guard as soon as config.json is read: AutoConfig inspects the raw dict before building a config
    # (e.g. it treats a mistral config with `layer_types` as ministral).
    @functools.wraps(original)
    def get_config_dict(cls, *args, **kwargs):
        config_dict, unused = original(cls, *args, **kwargs)
        return artifacts.lift_guard(config_dict), unused

    return get_config_dict


def _wrap_config_from_dict(original):
    @functools.wraps(original)
    def from_dict(cls, config_dict, **kwargs):
        return original(cls, artifacts.lift_guard(config_dict), **kwargs)

    return from_dict


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    register_quantization_config(QUANT_METHOD)(AccelQuantizationConfig)
    register_quantizer(QUANT_METHOD)(AccelHfQuantizer)
    PreTrainedModel.from_pretrained = classmethod(_wrap_from_pretrained(PreTrainedModel.from_pretrained.__func__))
    PreTrainedModel.save_pretrained = _wrap_save_pretrained(PreTrainedModel.save_pretrained)
    PreTrainedModel.push_to_hub = _wrap_push_to_hub(PreTrainedModel.push_to_hub)
    PreTrainedConfig.get_config_dict = classmethod(_wrap_get_config_dict(PreTrainedConfig.get_config_dict.__func__))
    PreTrainedConfig.from_dict = classmethod(_wrap_config_from_dict(PreTrainedConfig.from_dict.__func__))
    import transformers.pipelines as pipelines

    wrapped = _wrap_pipeline(pipelines.pipeline)
    pipelines.pipeline = wrapped
    transformers.pipeline = wrapped
    _on_applied.append(_on_model_changed)
    _installed = True
