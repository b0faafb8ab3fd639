"""`apply()` and `remove()`: one verb to accelerate a model or pipeline in place, atomically.

All checks (names, options, conflicts, model support) run before the first change. Plugins then apply in order,
each through its own Patcher; if any plugin fails, every change made so far is undone in reverse and the model is
exactly as before. Integrations (transformers, diffusers) are told after a successful apply so that the config of
the model carries the spec into `save_pretrained`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

from .config import AccelConfig
from .errors import AccelError
from .patching import Patcher
from .plugin import Plugin

STATE_ATTR = "_hf_accel_state"

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


def get_config(model: Any) -> AccelConfig:
    """The spec applied to `model` (empty if none)."""
    state = get_state(model)
    return state.config if state else AccelConfig()


def apply(model: Any, spec: Any, *, loading: bool = False) -> Any:
    """Apply `spec` to `model` (a transformers model, diffusers pipeline or model) in place and return it.

    `loading=True` is used by the loaders for artifacts whose weights are already rewritten: weight plugins then
    rebuild the structure (`prepare_for_loading`) instead of transforming float weights.
    """
    new = AccelConfig.from_spec(spec)
    state = get_state(model) or AccelState()
    combined = state.config + new  # raises on duplicates and conflicts with what is already applied
    for plugin in new.plugins:
        plugin.check(model)

    done: list[AppliedPlugin] = []
    previous = list(state.applied)
    try:
        for plugin in new.plugins:
            patcher = Patcher(plugin.name)
            done.append(AppliedPlugin(plugin, patcher))
            if loading and plugin.rewrites_weights:
                plugin.prepare_for_loading(model, patcher)
            else:
                plugin.apply(model, patcher)
        state.applied = sorted(previous + done, key=lambda a: (a.plugin.apply_order(), a.plugin.name))
        setattr(model, STATE_ATTR, state)
        for callback in _on_applied:
            callback(model, state)
    except BaseException as e:
        for applied in reversed(done):
            applied.patcher.undo()
        state.applied = previous
        if previous:
            for callback in _on_applied:
                callback(model, state)
        elif getattr(model, STATE_ATTR, None) is state:
            delattr(model, STATE_ATTR)
        if isinstance(e, AccelError):
            raise
        name = done[-1].plugin.name if done else "?"
        raise AccelError(f"plugin {name!r} failed ({type(e).__name__}: {e}); the model was left unchanged") from e

    for applied in done:  # only now may weight rewrites release the originals
        applied.patcher.commit()
    assert [a.plugin.name for a in state.applied] == combined.names
    return model


def remove(model: Any) -> list[str]:
    """Undo every undoable change hf_accel made to `model`; return (and warn about) what could not be undone."""
    state = get_state(model)
    if state is None:
        return []
    kept: list[AppliedPlugin] = []
    for applied in reversed(state.applied):
        applied.patcher.undo()  # undoes the undoable patches; irreversible ones stay recorded
        if applied.patcher.irreversible:
            kept.append(applied)
    state.applied = list(reversed(kept))
    left = [f"{a.plugin.name}: {desc}" for a in state.applied for desc in a.patcher.irreversible]
    for callback in _on_applied:
        callback(model, state)
    if not state.applied:
        delattr(model, STATE_ATTR)
    if left:
        warnings.warn(
            "hf_accel.remove(): these changes rewrote weights and cannot be undone (reload the model to get the "
            f"original weights back): {left[:5]}{' ...' if len(left) > 5 else ''}",
            stacklevel=2,
        )
    return left
