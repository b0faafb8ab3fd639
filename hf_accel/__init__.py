"""hf_accel: plugin-based acceleration for Hugging Face models.

    import hf_accel
    model = AutoModelForCausalLM.from_pretrained(model_id, accel="int8")
    hf_accel.apply(model, "int8")     # or on a model already loaded
    hf_accel.remove(model)            # undo what can be undone

Importing hf_accel registers its hooks in transformers (and diffusers, when installed); plugins are discovered
through the entry-point group `hf_accel.plugins`.
"""

from .apply import apply, get_config, remove
from .card import record_metric, render_card
from .config import AccelConfig
from .errors import (
    AccelError,
    ArtifactError,
    ConflictError,
    OptionError,
    SpecSyntaxError,
    UnknownPluginError,
    UnsupportedModelError,
)
from .plugin import Family, ModelKind, Plugin
from .registry import registry
from .version import __version__


def list_plugins():
    """Installed plugins (name, class, distribution, version), in apply order."""
    return registry.infos()


def _install_integrations() -> None:
    from .integrations import transformers as _transformers

    _transformers.install()
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return
    from .integrations import diffusers as _diffusers

    _diffusers.install()


_install_integrations()

__all__ = [
    "AccelConfig", "AccelError", "ArtifactError", "ConflictError", "Family", "ModelKind", "OptionError", "Plugin",
    "SpecSyntaxError", "UnknownPluginError", "UnsupportedModelError", "apply", "get_config", "list_plugins",
    "record_metric", "registry", "remove", "render_card", "__version__",
]
