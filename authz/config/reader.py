"""A strict reader over parsed YAML: typed getters that fail with the file and key path.

Unknown keys are errors, not warnings: a misspelled `burts:` silently ignored would leave a
limit at its default, which is exactly the kind of surprise a config checker exists to prevent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot read file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), "", "file is not UTF-8 text") from None
    return parse_yaml(text, str(p))


def parse_yaml(text: str, file: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(file, "", f"invalid YAML: {where}{problem}") from None


class Node:
    """A mapping in the document, with its key path for error messages."""

    def __init__(self, file: str, path: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.path = path
        self.data = data
        self._seen: set[str] = set()

    @classmethod
    def root(cls, file: str, data: Any) -> Node:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(file, "", f"expected a mapping at the top level, got {_kind(data)}")
        return cls(file, "", data)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name) if name else self.path, problem)

    def has(self, name: str) -> bool:
        return name in self.data and self.data[name] is not None

    def raw(self, name: str) -> Any:
        self._seen.add(name)
        return self.data.get(name)

    def section(self, name: str) -> Node:
        value = self.raw(name)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise self.error(name, f"expected a mapping, got {_kind(value)}")
        return Node(self.file, self.key(name), value)

    def text(self, name: str, default: str | None = None, *, allow_empty: bool = True) -> str:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required (a string)")
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_kind(value)}")
        if not allow_empty and not value.strip():
            raise self.error(name, "must not be empty")
        return value

    def opt_str(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(name, f"expected a non-empty string, got {_kind(value)}")
        return value

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {_kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.error(name, f"expected an integer {bound}, got {value}")
        return value

    def number(self, name: str, default: float | None = None, *, positive: bool = True) -> float:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required (a number)")
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise self.error(name, f"expected a finite number, got {value}")
        if positive and not value > 0:
            raise self.error(name, f"expected a number > 0, got {value}")
        return float(value)

    def duration(
        self, name: str, default: float | None = None, *, allow_zero: bool = False
    ) -> float:
        """Seconds, from a number (seconds) or a string like "50ms", "2s", "1m", "1d"."""
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required (a duration such as 1s, 1m, 1h, 1d)")
            return default
        seconds = parse_duration(value)
        if seconds is None:
            raise self.error(
                name, f"expected a duration such as 50ms, 2s, 1m, 1h, 1d or seconds, got {value!r}"
            )
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise self.error(name, f"expected a duration > 0, got {value!r}")
        return seconds

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}; got {value!r}")
        return value

    def str_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, "expected a list of non-empty strings")
        return tuple(value)

    def items(self, name: str) -> Iterator[tuple[str, Any]]:
        value = self.raw(name)
        if value is None:
            return iter(())
        if not isinstance(value, list):
            raise self.error(name, f"expected a list, got {_kind(value)}")
        return ((f"{self.key(name)}[{i}]", v) for i, v in enumerate(value))

    def child(self, path: str, value: Any) -> Node:
        if not isinstance(value, Mapping):
            raise ConfigError(self.file, path, f"expected a mapping, got {_kind(value)}")
        return Node(self.file, path, value)

    def done(self) -> None:
        """Refuse keys nobody read: they are typos or options this version does not have."""
        unknown = [k for k in self.data if k not in self._seen]
        if unknown:
            name = str(unknown[0])
            raise ConfigError(self.file, self.key(name), "unknown key (check the spelling)")


def parse_duration(value: Any) -> float | None:
    """Seconds, or None when `value` is not a finite duration (NaN and inf are not: a NaN
    leeway would make every time comparison false and switch the exp check off)."""
    seconds: float | None = None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds is None or not math.isfinite(seconds):
        return None
    return seconds


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"{type(value).__name__} ({value!r})"
