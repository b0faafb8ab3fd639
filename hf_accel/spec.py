"""The accel spec language: `name(key=value, ...)+name+...`.

Parsing turns a string into `[(name, {options})]` with Python literal values; it knows nothing of plugins, so the
registry can validate names and the plugin classes their options. Values: integers, floats, true/false, none,
quoted strings, bare words (strings) and `[a, b]` lists.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import SpecSyntaxError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]*")
_NUMBER = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./:]*")
_RATIO = re.compile(r"\d+:\d+")  # N:M sparsity patterns (`pattern=2:4`) are read as the string "2:4"
_KEYWORDS = {"true": True, "false": False, "none": None, "null": None}


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, expected: str):
        raise SpecSyntaxError(self.text, self.pos, expected)

    def ws(self):
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, what: str):
        if self.peek() != char:
            self.fail(what)
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> str:
        self.ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            self.fail(what)
        self.pos = m.end()
        return m.group(0)

    def spec(self) -> list[tuple[str, dict[str, Any]]]:
        items = [self.item()]
        while self.peek() == "+":
            self.pos += 1
            items.append(self.item())
        if self.peek():
            self.fail("'+' or end of spec")
        return items

    def item(self) -> tuple[str, dict[str, Any]]:
        name = self.match(_NAME, "a plugin name")
        options: dict[str, Any] = {}
        if self.peek() == "(":
            self.pos += 1
            if self.peek() != ")":
                while True:
                    key = self.match(_NAME, "an option name")
                    if key in options:
                        self.fail(f"a new option name ({key!r} given twice)")
                    self.expect("=", "'=' after the option name")
                    options[key] = self.value()
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect(")", "',' or ')'")
        return name, options

    def value(self) -> Any:
        c = self.peek()
        if c in "\"'":
            end = self.text.find(c, self.pos + 1)
            if end < 0:
                self.fail(f"a closing {c}")
            s = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return s
        if c == "[":
            self.pos += 1
            items = []
            if self.peek() != "]":
                items.append(self.value())
                while self.peek() == ",":
                    self.pos += 1
                    items.append(self.value())
            self.expect("]", "',' or ']'")
            return items
        ratio = _RATIO.match(self.text, self.pos)
        if ratio:
            self.pos = ratio.end()
            return ratio.group()
        if c and (c.isdigit() or c in "+-."):
            s = self.match(_NUMBER, "a number")
            return float(s) if any(ch in s for ch in ".eE") else int(s)
        word = self.match(_WORD, "a value (number, true/false, none, quoted string, word or [list])")
        return _KEYWORDS.get(word.lower(), word)


def parse_spec(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse `"int8+sink(window=1024, sinks=4)"` into `[("int8", {}), ("sink", {"window": 1024, "sinks": 4})]`."""
    if not isinstance(text, str):
        raise TypeError(f"spec must be a string, got {type(text).__name__}")
    return _Parser(text).spec()


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, str):
        if (_WORD.fullmatch(v) and v.lower() not in _KEYWORDS) or _RATIO.fullmatch(v):
            return v
        for quote in "'\"":
            if quote not in v:
                return f"{quote}{v}{quote}"
        raise SpecSyntaxError(v, 0, "a string without both quote characters (the spec language has no escapes)")
    return repr(v)


def format_spec(items: list[tuple[str, dict[str, Any]]]) -> str:
    """Inverse of `parse_spec`: `parse_spec(format_spec(x)) == x` for any parsed x."""
    parts = []
    for name, options in items:
        if options:
            args = ", ".join(f"{k}={format_value(v)}" for k, v in options.items())
            parts.append(f"{name}({args})")
        else:
            parts.append(name)
    return "+".join(parts)
