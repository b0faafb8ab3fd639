"""`AccelConfig`: the one canonical, serialisable form of an accel spec.

A spec may be a string (`"int8+sink(window=1024)"`), a dict (`{"int8": {}, "sink": {"window": 1024}}` or the
canonical `{"plugins": [{"name": ..., "options": {...}}]}`), a list of any of those items or plugin instances, or
an AccelConfig. All normalise to an ordered tuple of validated plugin instances with every option filled in, sorted
by apply order, so two spellings of the same spec compare and serialise equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from . import options as opts
from .errors import AccelError, ConflictError
from .plugin import Plugin
from .registry import PluginRegistry, registry
from .spec import format_spec, parse_spec

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AccelConfig:
    plugins: tuple[Plugin, ...] = ()

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Any, reg: PluginRegistry | None = None) -> "AccelConfig":
        if isinstance(spec, AccelConfig):
            return spec
        reg = reg or registry
        plugins = [_to_plugin(item, reg) for item in _items(spec)]
        config = cls(tuple(sorted(plugins, key=lambda p: (p.apply_order(), p.name))))
        config.check_conflicts()
        return config

    @classmethod
    def from_dict(cls, data: dict, reg: PluginRegistry | None = None) -> "AccelConfig":
        return cls.from_spec(data, reg)

    # -- views ---------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "plugins": [{"name": p.name, "options": opts.as_dict(p)} for p in self.plugins],
        }

    def to_string(self) -> str:
        return format_spec([(p.name, opts.as_dict(p)) for p in self.plugins])

    def __str__(self) -> str:
        return self.to_string()

    def __add__(self, other: "AccelConfig") -> "AccelConfig":
        merged = AccelConfig(tuple(sorted(self.plugins + other.plugins, key=lambda p: (p.apply_order(), p.name))))
        merged.check_conflicts()
        return merged

    def __bool__(self) -> bool:
        return bool(self.plugins)

    @property
    def rewrites_weights(self) -> bool:
        return any(p.rewrites_weights for p in self.plugins)

    def check_conflicts(self) -> None:
        seen: dict[str, Plugin] = {}
        for p in self.plugins:
            if p.name in seen:
                raise ConflictError(f"plugin {p.name!r} appears twice in the spec {self.to_string()!r}")
            seen[p.name] = p
        for a in self.plugins:
            for b in self.plugins:
                if a is not b and (b.name in a.conflicts_with or f"family:{b.family.value}" in a.conflicts_with):
                    raise ConflictError(
                        f"plugins {a.name!r} and {b.name!r} cannot be combined: {a.name!r} conflicts with "
                        f"{', '.join(a.conflicts_with)}; use one of them"
                    )


def _items(spec: Any) -> Iterable[Any]:
    if isinstance(spec, str):
        return parse_spec(spec)
    if isinstance(spec, Plugin):
        return [spec]
    if isinstance(spec, dict):
        if "plugins" in spec:
            version = spec.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise AccelError(f"accel config format_version {version} is not supported (this hf_accel reads {FORMAT_VERSION})")
            return spec["plugins"]
        return list(spec.items())
    if isinstance(spec, (list, tuple)):
        out: list[Any] = []
        for item in spec:
            out.extend(parse_spec(item) if isinstance(item, str) else [item])
        return out
    raise AccelError(
        f"accel spec must be a string, dict, list or AccelConfig, got {type(spec).__name__}; "
        "e.g. \"int8+sink(window=1024)\" or {'int8': {}}"
    )


def _to_plugin(item: Any, reg: PluginRegistry) -> Plugin:
    if isinstance(item, Plugin):
        reg.get(item.name)  # an instance of an unregistered plugin could not be restored from an artifact
        return item
    if isinstance(item, dict) and "name" in item:
        name, options = item["name"], item.get("options") or {}
    elif isinstance(item, tuple) and len(item) == 2:
        name, options = item
        options = options or {}
    else:
        raise AccelError(f"cannot read accel spec item {item!r}; expected 'name', 'name(k=v)', (name, options) or a Plugin")
    if not isinstance(name, str) or not isinstance(options, dict):
        raise AccelError(f"accel spec item needs a string name and a dict of options, got {item!r}")
    info = reg.get(name)
    return opts.build(info.cls, name, options)
