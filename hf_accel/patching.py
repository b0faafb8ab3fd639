"""Recorded, removable changes to a model.

A plugin never mutates a model directly: it asks a `Patcher`, which performs the change and keeps an undo record.
The core uses the records twice: to roll back every plugin of a spec when one of them fails (apply is atomic), and
for `hf_accel.remove()`. Weight rewrites hold the original module only until the spec is committed, so a
successful apply does not keep two copies of the weights; after that they are reported as not undoable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_MISSING = object()


@dataclass
class Patch:
    description: str
    undo_fn: Callable[[], None] | None
    drops_on_commit: bool = False  # weight rewrites: forget the original once the spec has succeeded

    @property
    def undoable(self) -> bool:
        return self.undo_fn is not None

    def undo(self) -> None:
        if self.undo_fn is not None:
            self.undo_fn()
            self.undo_fn = None

    def commit(self) -> None:
        if self.drops_on_commit:
            self.undo_fn = None


@dataclass
class Patcher:
    """Performs and records the changes of one plugin on one model."""

    plugin_name: str
    patches: list[Patch] = field(default_factory=list)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set `obj.name = value` (instance attribute); undo restores the old value or deletes the attribute."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)

        def undo():
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        setattr(obj, name, value)
        self.patches.append(Patch(f"{type(obj).__name__}.{name}", undo))

    def swap_module(self, root: torch.nn.Module, qualified_name: str, new: torch.nn.Module, *, rewrites_weights: bool) -> None:
        """Replace the submodule at `qualified_name`. With `rewrites_weights`, the original is released at commit."""
        parent_name, _, child = qualified_name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
        if getattr(old, "_hf_accel_tp", None) is not None:  # a tensor-parallel shard: the new module takes its role
            from .distributed import transfer_tp

            transfer_tp(old, new)
        setattr(parent, child, new)

        def undo():
            setattr(parent, child, old)

        self.patches.append(Patch(f"{qualified_name}: {type(old).__name__} -> {type(new).__name__}", undo, rewrites_weights))

    def add_hook(self, description: str, remove: Callable[[], None]) -> None:
        """Record a hook installed by the plugin (torch hook handle `.remove`, diffusers `remove_hook`, ...)."""
        self.patches.append(Patch(description, remove))

    def record_irreversible(self, description: str) -> None:
        self.patches.append(Patch(description, None))

    def undo(self) -> None:
        """Undo what can be undone, newest first. Irreversible changes stay recorded so they can be reported."""
        kept = []
        for patch in reversed(self.patches):
            if patch.undoable:
                patch.undo()
            else:
                kept.append(patch)
        self.patches = kept[::-1]

    def commit(self) -> None:
        for patch in self.patches:
            patch.commit()

    @property
    def irreversible(self) -> list[str]:
        return [p.description for p in self.patches if not p.undoable]
