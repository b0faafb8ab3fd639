"""hf_accel artifacts: what `save_pretrained` / `push_to_hub` of an accelerated model add to the usual files.

1. The spec, in `config.json` as `quantization_config` (quant_method "hf_accel"), so `from_pretrained(dir)` with
   hf_accel imported restores the model with no `accel=` argument.
2. SHA-256 checksums of the weight files, checked before loading: a tampered or truncated file is refused, not
   loaded.
3. A load guard. Without hf_accel, transformers only warns about the unknown quantization method and would load
   rewritten weights (int8 values cast to float) as if they were the model. So `layer_types` in `config.json` holds
   a message instead of layer names: every transformers loader validates that field and fails with the message.
   hf_accel lifts the guard (`lift_guard`) before the config is built.
4. A model card rendered from `model_cards/` (see `hf_accel.card`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArtifactError

QUANT_METHOD = "hf_accel"
GUARD_MESSAGE = (
    "this is an hf_accel artifact: `pip install hf-accel` and `import hf_accel` before from_pretrained "
    "(without it the accelerated weights would load as garbage)"
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(directory: str | os.PathLike) -> list[str]:
    return sorted(p.name for p in Path(directory).glob("*.safetensors"))


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """What an artifact records about one of its files, checked by `check_file` on load."""
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


def checksums(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    d = Path(directory)
    return {name: file_record(d / name) for name in weight_files(d)}


def lift_guard(config_dict: dict) -> dict:
    """Undo the load guard in a config dict (returns a copy when it changes anything)."""
    qc = config_dict.get("quantization_config")
    if not (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD and "guard" in qc):
        return config_dict
    out = dict(config_dict)
    original = qc["guard"].get("layer_types")
    if original is None:
        out.pop("layer_types", None)
    else:
        out["layer_types"] = original
    return out


def finalize(model: Any, save_directory: str | os.PathLike) -> None:
    """Add guard, checksums and card to a directory that transformers' save_pretrained has just written."""
    from .card import render_card

    directory = Path(save_directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    qc = config.get("quantization_config")
    if not (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD):
        raise ArtifactError(f"{config_path} has no hf_accel quantization_config; was the model saved by transformers?")
    guard = qc.get("guard") or {"layer_types": config.get("layer_types")}
    if config.get("layer_types") == [GUARD_MESSAGE]:  # saving a reloaded artifact: keep the original names
        guard = qc["guard"]
    qc["guard"] = guard
    qc["checksums"] = checksums(directory)
    config["layer_types"] = [GUARD_MESSAGE]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    render_card(model, directory).save(directory / "README.md")


def verify_transformers_artifact(path_or_repo: str | os.PathLike, hub_kwargs: dict) -> None:
    """If `path_or_repo` is an hf_accel artifact, check its weight files against the saved checksums."""
    if os.environ.get("HF_ACCEL_VERIFY", "1") == "0":
        return
    from transformers import PreTrainedConfig
    from transformers.utils import cached_file

    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path_or_repo, **hub_kwargs)
    except Exception:
        return  # not loadable as a config: transformers will raise its own error
    qc = config_dict.get("quantization_config")
    if not (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD):
        return
    for name, expected in (qc.get("checksums") or {}).items():
        try:
            local = cached_file(path_or_repo, name, **hub_kwargs)
        except Exception as e:
            raise ArtifactError(f"hf_accel artifact {path_or_repo}: weight file {name} is missing ({e})") from None
        check_file(local, expected, f"hf_accel artifact {path_or_repo}: {name}")


def check_file(local: str | os.PathLike, expected: dict[str, Any], what: str) -> None:
    """Refuse a file whose size or SHA-256 differs from what was recorded when the artifact was saved."""
    size = os.path.getsize(local)
    if size != expected["size"]:
        raise ArtifactError(
            f"{what} has {size} bytes but was saved with {expected['size']}: the file is truncated or was "
            "modified. Re-download it (force_download=True) or save the model again."
        )
    digest = sha256_file(local)
    if digest != expected["sha256"]:
        raise ArtifactError(
            f"{what} does not match the SHA-256 recorded when it was saved "
            f"({digest[:12]}… vs {expected['sha256'][:12]}…): the file was modified. Re-download it or save again."
        )


def push_folder(folder: str | os.PathLike, repo_id: str, *, token=None, private=None, revision=None,
                commit_message=None, create_pr=False, **_: Any):
    """Upload an artifact folder to the Hub (or whatever HF_ENDPOINT points at)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload hf_accel artifact",
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(model: Any, repo_id: str, **kwargs: Any):
    """save_pretrained (artifact, card) into a temporary folder and upload it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_kwargs = {k: kwargs.pop(k) for k in ("max_shard_size", "safe_serialization") if k in kwargs}
        model.save_pretrained(tmp, **save_kwargs)
        return push_folder(tmp, repo_id, **kwargs)


def read_spec(directory: str | os.PathLike) -> dict | None:
    """The accel spec stored in an artifact folder (None if it is not one)."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return None
    qc = json.loads(path.read_text()).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return copy.deepcopy({"format_version": qc.get("format_version"), "plugins": qc.get("plugins")})
    return None
