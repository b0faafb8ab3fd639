"""Typed plugin options: a plugin's dataclass fields are its options, checked here by their annotations.

Accepted annotations: int, float, bool, str, Literal[...], tuple[T, ...], and `T | None`. Values arrive from spec
strings (already parsed into Python literals), dicts or JSON, so coercion is strict: a bool is not an int, a float
with a fraction is not an int, and every failure names the option, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from .errors import OptionError


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any) -> Any:
    """Return `value` as type `tp`, or raise TypeError with a short reason."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return coerce(arm, value)
            except TypeError:
                continue
        raise TypeError
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):  # 1 must not match True
                return allowed
        raise TypeError
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(coerce(item_type, v) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError(f"unsupported option annotation {tp!r}")


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def describe_options(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    parts = []
    for f in option_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parts.append(f"{f.name} ({describe_type(hints[f.name])}, default {default!r})")
    return ", ".join(parts) or "(no options)"


def build(cls: type, plugin_name: str, options: dict[str, Any]):
    """Instantiate plugin `cls` from raw options, checking names and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in option_fields(cls)}
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise OptionError(
            f"plugin {plugin_name!r} has no option {unknown[0]!r}; accepted options: {describe_options(cls)}"
        )
    typed = {}
    for key, value in options.items():
        try:
            typed[key] = coerce(hints[key], value)
        except TypeError:
            raise OptionError(
                f"plugin {plugin_name!r}: option {key!r} expects {describe_type(hints[key])}, got {value!r}; "
                f"accepted options: {describe_options(cls)}"
            ) from None
    try:
        return cls(**typed)
    except OptionError:
        raise
    except (ValueError, TypeError) as e:
        raise OptionError(f"plugin {plugin_name!r}: {e}; accepted options: {describe_options(cls)}") from None


def as_dict(plugin: Any) -> dict[str, Any]:
    """All option values of a plugin instance, JSON-friendly (tuples become lists)."""
    out = {}
    for f in option_fields(type(plugin)):
        v = getattr(plugin, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
