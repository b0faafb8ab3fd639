"""Errors that tell the user what is wrong and what is accepted.

Every failure hf_accel raises on bad input derives from `AccelError`, so callers can catch one type; the message
alone must be enough to fix the call.
"""

from __future__ import annotations

import difflib


class AccelError(ValueError):
    """Base class of hf_accel's user-facing errors."""


class SpecSyntaxError(AccelError):
    """A spec string does not follow `name(key=value, ...)+name...`."""

    def __init__(self, text: str, pos: int, expected: str):
        caret = " " * pos + "^"
        super().__init__(
            f"malformed accel spec at position {pos}: expected {expected}\n  {text}\n  {caret}\n"
            "accepted form: 'plugin' or 'plugin(option=value, ...)', joined with '+', "
            "e.g. \"int8+sink(window=1024, sinks=4)\""
        )
        self.text, self.pos = text, pos


class UnknownPluginError(AccelError):
    def __init__(self, name: str, installed: list[str], broken: dict[str, str] | None = None):
        close = difflib.get_close_matches(name, installed, n=3)
        msg = f"unknown hf_accel plugin {name!r}."
        if close:
            msg += f" Did you mean {', '.join(map(repr, close))}?"
        msg += f" Installed plugins: {', '.join(sorted(installed)) or '(none)'}."
        if broken and name in broken:
            msg = f"hf_accel plugin {name!r} is installed but failed to import: {broken[name]}"
        super().__init__(msg)
        self.name = name


class OptionError(AccelError):
    """An option that a plugin does not have, or a value of the wrong type or range."""


class ConflictError(AccelError):
    """Two plugins that cannot be applied together."""


class UnsupportedModelError(AccelError):
    """A plugin applied to a model kind it does not support."""


class ArtifactError(AccelError):
    """A saved artifact that cannot be trusted or restored (tampered, truncated, missing plugin)."""
