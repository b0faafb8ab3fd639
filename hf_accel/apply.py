"""`apply()` and `remove()`: one verb to accelerate a model or pipeline in place, atomically.

All checks (names, options, conflicts, model support) run before the first change. Plugins then apply in order,
each through its own Patcher; if any plugin fails, every change made so far is undone in reverse and the model is
exactly as before. Integrations (transformers, diffusers) are told after a successful apply so that the config of
the model carries the spec into `save_pretrained`.

A diffusers pipeline is a target made of parts: a plugin that supports DIFFUSION_PIPELINE acts on the pipeline, one
that only supports DIFFUSION_MODEL acts on its denoiser (`pipe.transformer`, else `pipe.unet`). Each part keeps its
own state, so a component saves and reloads with its own spec; `get_config(pipe)` and `remove(pipe)` cover all parts.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

from .config import AccelConfig
from .errors import AccelError
from .patching import Patcher
from .plugin import ModelKind, Plugin, model_kind

STATE_ATTR = "_hf_accel_state"
DENOISER_ATTRS = ("transformer", "unet")  # where a pipeline keeps the model that runs every denoising step

# Integrations register callbacks here: on_applied(model, state) runs after every successful apply or remove.
_on_applied: list[Callable[[Any, "AccelState"], None]] = []


@dataclasses.dataclass
class AppliedPlugin:
    plugin: Plugin
    patcher: Patcher


@dataclasses.dataclass
class AccelState:
    applied: list[AppliedPlugin] = dataclasses.field(default_factory=list)

    @property
    def config(self) -> AccelConfig:
        return AccelConfig(tuple(a.plugin for a in self.applied))


def get_state(model: Any) -> AccelState | None:
    return getattr(model, STATE_ATTR, None)


def _denoiser(pipe: Any) -> Any:
    for attr in DENOISER_ATTRS:
        part = getattr(pipe, attr, None)
        if part is not None:
            return part
    return None


def _parts(model: Any) -> list[Any]:
    """The objects that carry state for `model`: itself, plus the denoiser of a pipeline."""
    if model_kind(model) is ModelKind.DIFFUSION_PIPELINE:
        denoiser = _denoiser(model)
        if denoiser is not None:
            return [model, denoiser]
    return [model]


def _target(model: Any, plugin: Plugin) -> Any:
    """Where `plugin` acts when applied to `model`: a pipeline's denoiser for model-only plugins, else the model."""
    kinds = plugin.supported_kinds
    if (model_kind(model) is ModelKind.DIFFUSION_PIPELINE and ModelKind.DIFFUSION_PIPELINE not in kinds
            and ModelKind.DIFFUSION_MODEL in kinds):
        denoiser = _denoiser(model)
        return model if denoiser is None else denoiser  # no denoiser: check() then says what the plugin accepts
    return model


def _sorted(applied: list[AppliedPlugin]) -> list[AppliedPlugin]:
    return sorted(applied, key=lambda a: (a.plugin.apply_order(), a.plugin.name))


def get_config(model: Any) -> AccelConfig:
    """The spec applied to `model` (empty if none); for a pipeline, what is applied to it and to its denoiser."""
    applied = [a for part in _parts(model) for a in getattr(get_state(part), "applied", [])]
    return AccelConfig(tuple(a.plugin for a in _sorted(applied)))


def _notify(target: Any, state: AccelState) -> None:
    for callback in _on_applied:
        callback(target, state)


def apply(model: Any, spec: Any, *, loading: bool = False) -> Any:
    """Apply `spec` to `model` (a transformers model, diffusers pipeline or model) in place and return it.

    `loading=True` is used by the loaders for artifacts whose weights are already rewritten: weight plugins then
    rebuild the structure (`prepare_for_loading`) instead of transforming float weights.
    """
    new = AccelConfig.from_spec(spec)
    combined = get_config(model) + new  # raises on duplicates and conflicts with what is already applied
    targets = [(plugin, _target(model, plugin)) for plugin in new.plugins]
    for plugin, target in targets:
        plugin.check(target)
        if plugin.rewrites_weights and not loading:
            from .distributed import check_weight_rewrite

            check_weight_rewrite(target, plugin.name)  # device_map offload: the weights are not there to rewrite

    # One state per target, with what it held before, so a failure can put every target back.
    states: dict[int, tuple[Any, AccelState, list[AppliedPlugin]]] = {}
    for _, target in targets:
        if id(target) not in states:
            state = get_state(target) or AccelState()
            states[id(target)] = (target, state, list(state.applied))
    done: list[tuple[Any, AppliedPlugin]] = []
    notified: list[Any] = []
    if getattr(model, "_tp_size", None) and model._tp_size > 1:
        from .distributed import localize

        localize(model)  # transformers' TP (DTensor) layers -> local shards that plugins can rewrite
    try:
        for plugin, target in targets:
            patcher = Patcher(plugin.name)
            done.append((target, AppliedPlugin(plugin, patcher)))
            if loading and plugin.rewrites_weights:
                plugin.prepare_for_loading(target, patcher)
            else:
                plugin.apply(target, patcher)
        for target, state, previous in states.values():
            state.applied = _sorted(previous + [a for t, a in done if t is target])
            setattr(target, STATE_ATTR, state)
            notified.append(target)
            _notify(target, state)
    except BaseException as e:
        for _, applied in reversed(done):
            applied.patcher.undo()
        for target, state, previous in states.values():
            state.applied = previous
            if previous or any(t is target for t in notified):
                _notify(target, state)  # integrations undo what they derived from the state (config, class)
            if not previous and getattr(target, STATE_ATTR, None) is state:
                delattr(target, STATE_ATTR)
        if isinstance(e, AccelError):
            raise
        name = done[-1][1].plugin.name if done else "?"
        raise AccelError(f"plugin {name!r} failed ({type(e).__name__}: {e}); the model was left unchanged") from e

    for _, applied in done:  # only now may weight rewrites release the originals
        applied.patcher.commit()
    assert get_config(model).names == combined.names
    return model


def remove(model: Any) -> list[str]:
    """Undo every undoable change hf_accel made to `model` (and to a pipeline's denoiser); return (and warn about)
    what could not be undone."""
    left: list[str] = []
    for part in _parts(model):
        state = get_state(part)
        if state is None:
            continue
        kept: list[AppliedPlugin] = []
        for applied in reversed(state.applied):
            applied.patcher.undo()  # undoes the undoable patches; irreversible ones stay recorded
            if applied.patcher.irreversible:
                kept.append(applied)
        state.applied = list(reversed(kept))
        left += [f"{a.plugin.name}: {desc}" for a in state.applied for desc in a.patcher.irreversible]
        _notify(part, state)
        if not state.applied:
            delattr(part, STATE_ATTR)
    if left:
        warnings.warn(
            "hf_accel.remove(): these changes rewrote weights and cannot be undone (reload the model to get the "
            f"original weights back): {left[:5]}{' ...' if len(left) > 5 else ''}",
            stacklevel=2,
        )
    return left


def find_applied(model: Any, name: str) -> tuple[Plugin, Any] | None:
    """The applied plugin instance called `name` and the object it acts on (the model, or a pipeline's denoiser)."""
    for part in _parts(model):
        for applied in getattr(get_state(part), "applied", []):
            if applied.plugin.name == name:
                return applied.plugin, part
    return None


def options_changed(model: Any) -> None:
    """Call after a plugin's options were updated in place (e.g. by calibration) so the saved spec follows."""
    for part in _parts(model):
        state = get_state(part)
        if state is not None:
            _notify(part, state)
