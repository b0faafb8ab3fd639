"""The component classes of hf_accel diffusers artifacts: `Accel<Model>` for every diffusers model class.

An accelerated pipeline saves its denoiser as `["hf_accel.diffusers_models", "AccelUNet2DModel"]` in model_index.json
(this import path is written into users' artifacts: keep it stable). Diffusers resolves that library only from
`sys.modules`, so without `import hf_accel` the pipeline refuses to load and says which module to import; with it, the
class below rebuilds the accelerated structure before the weights load. The component's config.json carries:

- `_hf_accel`: the spec, the hf_accel version, and the SHA-256 and size of every weight file (checked before loading).
- `quantization_config`: a load guard. Loading the folder with the plain class without hf_accel (e.g.
  `UNet2DModel.from_pretrained(dir, subfolder="unet")`) stops at the unknown quantization method, whose name is the
  message saying to install and import hf_accel, instead of loading int8 weights as floats.

Classes are created on first use by name (module `__getattr__`), so any diffusers model class works.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import ModelMixin  # noqa: F401  diffusers looks up the base classes of a component here by name

from .apply import apply, get_config
from .artifacts import GUARD_MESSAGE, check_file, file_record
from .config import AccelConfig
from .errors import AccelError, ArtifactError, ConflictError
from .version import __version__

PREFIX = "Accel"
CONFIG_KEY = "_hf_accel"  # private: diffusers passes no "_" key to __init__ and keeps it out of pipe.components
WEIGHTS_STEM = "diffusion_pytorch_model"  # diffusers' file name for model weights
HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# Loader options diffusers passes to every component; they do not change what an artifact is.
IGNORED_KEYS = ("low_cpu_mem_usage", "max_memory", "offload_folder", "offload_state_dict", "disable_mmap",
                "use_safetensors", "use_flashpack", "mirror", "_from_pipeline")

GUARD = {"quant_method": GUARD_MESSAGE}
_classes: dict[type, type] = {}
# Set while a pipeline saves its components: the card goes to the pipeline folder, not to each component's.
in_pipeline_save: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_accel_in_pipeline_save", default=False)


def spec_record(config: AccelConfig) -> dict[str, Any]:
    return {**config.to_dict(), "hf_accel_version": __version__}


def restore_spec(record: dict, where: str) -> AccelConfig:
    try:
        return AccelConfig.from_dict({"format_version": record.get("format_version", 1), "plugins": record.get("plugins") or []})
    except AccelError as e:
        raise ArtifactError(
            f"cannot restore the hf_accel artifact {where} (saved by hf_accel {record.get('hf_accel_version', '?')}): {e}"
        ) from None


class AccelComponent:
    """Mixin of every `Accel<Model>` class: loads and saves the accelerated form of `_accel_base`."""

    _accel_base: type

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, accel=None, **kwargs):
        requested = AccelConfig.from_spec(accel) if accel is not None else None  # bad specs fail before loading
        where = str(pretrained_model_name_or_path)
        hub = {k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs}
        config = dict(cls.load_config(pretrained_model_name_or_path, **hub))
        record = config.pop(CONFIG_KEY, None)
        if not isinstance(record, dict):
            if config.get("quantization_config") == GUARD:
                raise ArtifactError(f"{where} carries the hf_accel load guard but no spec: it is damaged; save it again")
            # a plain checkpoint: load it as such, then accelerate it
            return cls._accel_base.from_pretrained(pretrained_model_name_or_path, accel=accel, **hub, **kwargs)
        config.pop("quantization_config", None)  # the load guard
        spec = restore_spec(record, where)  # before any weight is read
        if kwargs.pop("quantization_config", None) is not None:
            raise ConflictError(f"{where} is an hf_accel artifact ({spec}); it cannot also take a quantization_config")
        variant = kwargs.pop("variant", None)
        if variant is not None and variant != record.get("variant"):
            raise ArtifactError(f"{where} was saved with variant={record.get('variant')!r}, not {variant!r}")
        if kwargs.pop("output_loading_info", False):
            raise AccelError("output_loading_info=True is not supported for hf_accel artifacts (they load strictly)")
        dtype, alias = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        dtype = dtype or alias
        device = _single_device(kwargs.pop("device_map", None))
        for key in IGNORED_KEYS:
            kwargs.pop(key, None)
        files = [_fetch(pretrained_model_name_or_path, name, expected, hub) for name, expected in _weight_records(record, where)]

        with _empty_weights():
            model = cls.from_config(config, **kwargs)  # remaining kwargs override config values, as in diffusers
        weight_plugins = [p for p in spec.plugins if p.rewrites_weights]
        if weight_plugins:
            apply(model, weight_plugins, loading=True)  # the rewritten structure, still empty
        _load_strict(model, files, dtype, device, where)
        model.eval()
        model.register_to_config(_name_or_path=where)
        rest = [p for p in spec.plugins if not p.rewrites_weights]
        if requested:
            rest += [p for p in requested.plugins if p.name not in spec.names]
        if rest:
            apply(model, rest)
        return model

    # Explicit parameters: DiffusionPipeline.save_pretrained passes `variant`, `max_shard_size`, ... only to save
    # methods whose signature names them.
    def save_pretrained(self, save_directory, is_main_process=True, save_function=None, safe_serialization=True,
                        variant=None, max_shard_size="10GB", push_to_hub=False, **kwargs):
        options = dict(is_main_process=is_main_process, save_function=save_function, variant=variant,
                       max_shard_size=max_shard_size)
        if not get_config(self):
            return super().save_pretrained(save_directory, safe_serialization=safe_serialization,
                                           push_to_hub=push_to_hub, **options, **kwargs)
        if not safe_serialization or kwargs.get("use_flashpack"):
            raise ArtifactError("hf_accel artifacts are saved as safetensors: drop safe_serialization=False / use_flashpack=True")
        base = type(self)._accel_base
        if getattr(diffusers, base.__name__, None) is not base:
            raise ArtifactError(
                f"cannot save {type(self).__name__} as an hf_accel artifact: its base class {base.__module__}."
                f"{base.__name__} is not a diffusers class, so a loader could not find it by name"
            )
        super().save_pretrained(save_directory, **options, **kwargs)
        if is_main_process:
            finalize(self, Path(save_directory), variant)
            if push_to_hub:  # like diffusers' save_pretrained(push_to_hub=True), but with our card
                from .artifacts import push_folder

                push_folder(save_directory, kwargs.get("repo_id", Path(save_directory).name), token=kwargs.get("token"),
                            private=kwargs.get("private"), commit_message=kwargs.get("commit_message"),
                            create_pr=kwargs.get("create_pr", False))


def accel_class(base: type) -> type:
    """`Accel<base>`: the class an accelerated `base` model has, so that it saves and reloads as an artifact."""
    if issubclass(base, AccelComponent):
        return base
    cls = _classes.get(base)
    if cls is None:
        name = PREFIX + base.__name__
        cls = type(name, (AccelComponent, base), {
            "__module__": __name__, "__qualname__": name, "_accel_base": base,
            "__doc__": f"{base.__name__} with an hf_accel spec applied; see hf_accel.diffusers_models.",
        })
        _classes[base] = cls
        if getattr(diffusers, base.__name__, None) is base:
            globals()[name] = cls  # resolvable by name, as diffusers and pickle do
    return cls


def __getattr__(name: str) -> type:
    base = getattr(diffusers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if isinstance(base, type) and issubclass(base, ModelMixin) and base is not ModelMixin:
        return accel_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def artifact_class(config: dict) -> type | None:
    """The Accel class an artifact's config.json names, or None for a plain checkpoint."""
    name = config.get("_class_name")
    if not (isinstance(config.get(CONFIG_KEY), dict) and isinstance(name, str) and name.startswith(PREFIX)):
        return None
    try:
        return __getattr__(name)
    except AttributeError:
        raise ArtifactError(
            f"this hf_accel artifact is a {name}, but diffusers {diffusers.__version__} has no model class "
            f"{name[len(PREFIX):]}; upgrade diffusers"
        ) from None


# -- saving ------------------------------------------------------------------------------------------------------
def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' file naming: the variant goes before the last extension."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _written_files(directory: Path, variant: str | None) -> list[str]:
    index = directory / _with_variant(f"{WEIGHTS_STEM}.safetensors.index.json", variant)
    if index.exists():  # sharded
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [_with_variant(f"{WEIGHTS_STEM}.safetensors", variant)]


def finalize(model: Any, directory: Path, variant: str | None) -> None:
    """Record checksums and the load guard in the config.json that diffusers has just written."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    record = config.get(CONFIG_KEY)
    if not isinstance(record, dict):
        raise ArtifactError(f"{config_path} has no hf_accel spec; was it written by {type(model).__name__}.save_pretrained?")
    record["variant"] = variant
    record["checksums"] = {
        name: file_record(directory / name) for name in _written_files(directory, variant)
    }
    config["quantization_config"] = GUARD
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not in_pipeline_save.get():
        from .card import render_card

        render_card(model, directory).save(directory / "README.md")


# -- loading -----------------------------------------------------------------------------------------------------
def _weight_records(record: dict, where: str) -> list[tuple[str, dict]]:
    checksums = record.get("checksums")
    if not checksums:
        raise ArtifactError(f"hf_accel artifact {where} records no weight files; save it again with hf_accel")
    return sorted(checksums.items())


def _fetch(path_or_repo, name: str, expected: dict, hub: dict) -> str:
    """The local path of one weight file, checked against the size and SHA-256 recorded when it was saved."""
    where = str(path_or_repo)
    if os.path.isdir(path_or_repo):
        local = os.path.join(path_or_repo, hub.get("subfolder") or "", name)
        if not os.path.isfile(local):
            raise ArtifactError(f"hf_accel artifact {where}: weight file {name} is missing")
    else:
        from huggingface_hub import hf_hub_download

        keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
        try:
            local = hf_hub_download(where, name, **{k: hub[k] for k in keys if hub.get(k) is not None})
        except Exception as e:
            raise ArtifactError(f"hf_accel artifact {where}: weight file {name} is missing ({e})") from None
    if os.environ.get("HF_ACCEL_VERIFY", "1") == "0":
        return local
    check_file(local, expected, f"hf_accel artifact {where}: {name}")
    return local


def _single_device(device_map) -> torch.device | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, (int, str, torch.device)) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device(device_map)
    raise AccelError(f"hf_accel components load on one device; got device_map={device_map!r}. Pass e.g. device_map='cuda'")


def _empty_weights():
    """Build the skeleton without allocating parameters (buffers stay real), as diffusers does."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - diffusers depends on accelerate in practice; then it is merely slower
        return contextlib.nullcontext()
    return init_empty_weights()


def _load_strict(model: torch.nn.Module, files: list[str], dtype, device, where: str) -> None:
    from safetensors.torch import load_file

    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        state_dict.update(load_file(path, device=str(device or "cpu")))
    own = model.state_dict(keep_vars=True)
    fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in state_dict.items():
        ref = own.get(name)
        if ref is not None and tensor.is_floating_point() and ref.is_floating_point():
            # floats follow torch_dtype (else the model's default dtype), as in diffusers; int8 and friends stay
            want = torch.float32 if any(m in name.split(".") for m in fp32) else (dtype or ref.dtype)
            state_dict[name] = tensor.to(want)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ArtifactError(
            f"hf_accel artifact {where}: the saved weights do not fit {type(model).__name__} rebuilt from its config "
            f"and spec {get_config(model)}: {e}"
        ) from None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ArtifactError(f"hf_accel artifact {where}: {name} was not in the saved weights")
    if device is not None:
        model.to(device)  # non-persistent buffers
