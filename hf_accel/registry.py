"""Plugin discovery through the entry-point group `hf_accel.plugins`.

First-party plugins are registered there by hf_accel's own pyproject, exactly like a third party's, so the core
never imports a plugin by name. A plugin that fails to import is recorded with its error and the others still work.
`HF_ACCEL_DISABLE_PLUGINS=a,b` blocks plugins by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points

from .errors import AccelError, UnknownPluginError
from .plugin import Plugin

GROUP = "hf_accel.plugins"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    cls: type[Plugin]
    distribution: str
    version: str


class PluginRegistry:
    def __init__(self, group: str = GROUP):
        self.group = group
        self._plugins: dict[str, PluginInfo] | None = None
        self.broken: dict[str, str] = {}

    def _discover(self) -> dict[str, PluginInfo]:
        if self._plugins is not None:
            return self._plugins
        blocked = {n.strip() for n in os.environ.get("HF_ACCEL_DISABLE_PLUGINS", "").split(",") if n.strip()}
        found: dict[str, PluginInfo] = {}
        for ep in entry_points(group=self.group):
            if ep.name in blocked or ep.name in found:
                continue
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            try:
                cls = ep.load()
                _validate(ep.name, cls)
            except Exception as e:  # a broken plugin must not take the others down
                self.broken[ep.name] = f"{type(e).__name__}: {e} (from {dist} {version}, {ep.value})"
                continue
            found[ep.name] = PluginInfo(ep.name, cls, dist, version)
        self._plugins = found
        return found

    def register(self, cls: type[Plugin], distribution: str = "local", version: str = "0") -> None:
        """Register a plugin class directly (tests, notebooks). Entry points are the normal route."""
        _validate(cls.name, cls)
        self._discover()[cls.name] = PluginInfo(cls.name, cls, distribution, version)

    def unregister(self, name: str) -> None:
        self._discover().pop(name, None)

    def reload(self) -> None:
        self._plugins, self.broken = None, {}

    def get(self, name: str) -> PluginInfo:
        plugins = self._discover()
        if name not in plugins:
            raise UnknownPluginError(name, list(plugins), self.broken)
        return plugins[name]

    def infos(self) -> list[PluginInfo]:
        return sorted(self._discover().values(), key=lambda i: (i.cls.apply_order(), i.name))


def _validate(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise AccelError(f"entry point {name!r} does not point to an hf_accel.Plugin subclass (got {cls!r})")
    if getattr(cls, "name", None) != name:
        raise AccelError(f"entry point {name!r} points to plugin class named {getattr(cls, 'name', None)!r}")
    if not isinstance(getattr(cls, "family", None), str):
        raise AccelError(f"plugin {name!r} does not declare its family")


registry = PluginRegistry()
