"""A strict reader over parsed YAML: typed getters that fail with the file and key path.

Unknown keys are errors, not warnings: a misspelled `burts:` silently ignored would leave a
limit at its default, which is exactly the kind of surprise a config checker exists to prevent.

Every problem is collected (`errors.Problems`), not only the first: a bad value is recorded and
its default used so the rest of the file is still checked; the file's parser raises them all
at the end (`Problems.raise_if_any`), so nothing half-read is ever used.

Parsing is bounded before anything is built from the text: files over `MAX_FILE_BYTES`,
nesting deeper than `MAX_DEPTH` and more than `MAX_NODES` nodes (aliases count every time
they are used, so an "alias bomb" is refused too) are errors, never a RecursionError or a
parse that runs for seconds.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import ConfigError
from .problems import Problems

# A Kubernetes ConfigMap holds at most 1 MiB, so no mounted config or quota file is larger;
# parsing 1 MiB takes ~0.7 s with libyaml (measured: 14k overrides), and runs off the event
# loop on reloads.
MAX_FILE_BYTES = 1 << 20
# The deepest key either file has is 6 levels down (plans.P.models.M.limits[i].name); 20
# leaves room for anchors and flow style while refusing the thousands of levels that make a
# recursive parser overflow the stack.
MAX_DEPTH = 20
# A 1 MiB file has at most ~350k nodes (one-character flow items); aliases can multiply what
# a reader walks, so uses of an alias count again.
MAX_NODES = 1_000_000

# The spelling of a duration string (the config schemas carry it as their `pattern`).
DURATION_SYNTAX = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*(us|ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# libyaml (PyYAML's C parser, in every PyPI wheel for Linux): ~4x faster than the pure-Python
# parser, whose composer recurses once per nesting level.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_T = TypeVar("_T")


def read_text(path: str | Path, *, file: str | None = None, key: str = "") -> str:
    """The file's text, bounded by MAX_FILE_BYTES. Errors name `file`/`key` when given (the
    config file and the key that refers to `path`), else the file itself."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        where, what, prefix = _whose(p, file, key)
        raise ConfigError(where, what, f"{prefix}: {e.strerror or e}") from None
    return decode_text(data, p, file=file, key=key)


def decode_text(data: bytes, path: str | Path, *, file: str | None = None,
                key: str = "") -> str:
    """A file's bytes (at most MAX_FILE_BYTES + 1 read) as text, or ConfigError."""
    if len(data) > MAX_FILE_BYTES:
        where, what, prefix = _whose(Path(path), file, key)
        raise ConfigError(where, what, f"{prefix}: larger than {MAX_FILE_BYTES} bytes (1 MiB, "
                          "what a Kubernetes ConfigMap can hold)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        where, what, prefix = _whose(Path(path), file, key)
        raise ConfigError(where, what, f"{prefix}: not UTF-8 text") from None


def _whose(p: Path, file: str | None, key: str) -> tuple[str, str, str]:
    if file is not None:
        return file, key, f"cannot read {p}"
    return str(p), "", "cannot read file"


def load_yaml(path: str | Path) -> Any:
    return parse_yaml(read_text(path), str(path))


def parse_yaml(text: str, file: str) -> Any:
    """The document's data, or None for an empty (or comments-only) document."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(file, "", f"larger than {MAX_FILE_BYTES} bytes")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_shape(node, file)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        if "nesting depth" in problem:  # libyaml's own bound (1000 levels)
            problem = f"nested deeper than {MAX_DEPTH} levels"
        raise ConfigError(file, "", f"invalid YAML: {where}{problem}") from None
    except RecursionError:  # the pure-Python parser, before our depth check could run
        raise ConfigError(file, "", f"invalid YAML: nested deeper than {MAX_DEPTH} levels") \
            from None
    finally:
        loader.dispose()


def _check_shape(root: yaml.Node, file: str) -> None:
    """Depth and size of the node tree, walked without recursion."""
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    visited = 0
    while stack:
        node, depth = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise ConfigError(file, "", f"more than {MAX_NODES} YAML nodes (aliases counted "
                              "each time they are used)")
        if depth > MAX_DEPTH:
            mark = node.start_mark
            raise ConfigError(file, "", f"line {mark.line + 1}: nested deeper than "
                              f"{MAX_DEPTH} levels")
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)


class Node:
    """A mapping in the document, with its key path for error messages."""

    def __init__(self, file: str, path: str, data: Mapping[str, Any],
                 problems: Problems | None = None) -> None:
        self.file = file
        self.path = path
        self.data = data
        self.problems = problems if problems is not None else Problems()
        self._errors_before = len(self.problems)
        self._seen: set[str] = set()

    @classmethod
    def root(cls, file: str, data: Any, problems: Problems | None = None) -> Node:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(file, "", f"expected a mapping at the top level, got {_kind(data)}")
        return cls(file, "", data, problems)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name) if name else self.path, problem)

    def report(self, name: str, problem: str) -> None:
        """Record a problem and go on (the caller continues with a default)."""
        self.problems.add(self.error(name, problem))

    @property
    def failed(self) -> bool:
        """Something under this node was refused: checks across its keys would only repeat it."""
        return len(self.problems) > self._errors_before

    def _bad(self, name: str, problem: str, default: Any) -> Any:
        if default is None:
            raise self.error(name, problem)  # required: the enclosing part cannot go on
        self.report(name, problem)
        return default

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
            self.report(name, f"expected a mapping, got {_kind(value)}")
            value = {}
        return Node(self.file, self.key(name), value, self.problems)

    def text(self, name: str, default: str | None = None, *, allow_empty: bool = True,
             pattern: re.Pattern[str] | None = None, hint: str = "") -> str:
        """A string; `pattern` (matched from the start, as the schema's `pattern` is) and
        `hint` (what it is, for the message) restrict it."""
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required (a string)")
            return default
        if not isinstance(value, str):
            return str(self._bad(name, f"expected a string, got {_kind(value)}", default))
        if not allow_empty and not value.strip():
            return str(self._bad(name, "must not be empty", default))
        if pattern is not None and not pattern.match(value):
            # Reported, not raised, even when required: the rest of the part is still checked.
            self.report(name, f"expected {hint}, got {_short(value)}")
            return value if default is None else default
        return value

    def opt_str(self, name: str, *, pattern: re.Pattern[str] | None = None,
                hint: str = "") -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.report(name, f"expected a non-empty string, got {_kind(value)}")
            return None
        if pattern is not None and not pattern.match(value):
            self.report(name, f"expected {hint}, got {_short(value)}")
            return None
        return value

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            return int(self._bad(name, f"expected an integer, got {_kind(value)}", default))
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            return int(self._bad(name, f"expected an integer {bound}, got {_short(value)}",
                                 default))
        return value

    def number(self, name: str, default: float | None = None, *, positive: bool = True,
               minimum: float | None = None, maximum: float | None = None) -> float:
        """A finite number; `positive`: > 0 (else >= 0); `minimum`/`maximum` inclusive."""
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required (a number)")
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            return float(self._bad(name, f"expected a number, got {_kind(value)}", default))
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any double
            number = math.inf
        if not math.isfinite(number):
            return float(self._bad(name, f"expected a finite number, got {_short(value)}",
                                   default))
        if positive and not number > 0:
            return float(self._bad(name, f"expected a number > 0, got {_short(value)}", default))
        if not positive and number < 0:
            return float(self._bad(name, f"expected a number >= 0, got {_short(value)}", default))
        if (minimum is not None and number < minimum) or (maximum is not None
                                                          and number > maximum):
            if maximum is None:
                want = f"a number >= {minimum:g}"
            elif minimum is None:
                want = f"a number {'> 0' if positive else '>= 0'} and <= {maximum:g}"
            else:
                want = f"a number between {minimum:g} and {maximum:g}"
            return float(self._bad(name, f"expected {want}, got {_short(value)}", default))
        return number

    def duration(
        self, name: str, default: float | None = None, *, allow_zero: bool = False,
        minimum: float | None = None, maximum: float | None = None, above: str = "",
    ) -> float:
        """Seconds, from a number (seconds) or a string like "50ms", "2s", "1m", "1d".

        `minimum`/`maximum` (seconds, inclusive) bound it; 0 is allowed only with `allow_zero`
        (and then is not subject to `minimum`: 0 means "off"). `above`: the message for a
        value over `maximum`, when the reason deserves saying."""
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.error(name, "is required (a duration such as 1s, 1m, 1h, 1d)")
            return default
        seconds = parse_duration(value)
        if seconds is None:
            return float(self._bad(
                name, f"expected a duration such as 50ms, 2s, 1m, 1h, 1d or seconds, got "
                f"{_short(value)}", default))
        if seconds < 0 or (seconds == 0 and not allow_zero):
            return float(self._bad(name, f"expected a duration > 0, got {_short(value)}",
                                   default))
        if seconds == 0:
            return 0.0
        if above and maximum is not None and seconds > maximum:
            return float(self._bad(name, above, default))
        if above:  # the maximum has its own message: the one below is about the minimum
            maximum = None
        if (minimum is not None and seconds < minimum) or (maximum is not None
                                                           and seconds > maximum):
            zero = " (or 0 to turn it off)" if allow_zero else ""
            if maximum is None:
                assert minimum is not None
                want = f"of at least {format_duration(minimum)}"
            else:
                low = format_duration(minimum) if minimum is not None else "0"
                want = f"between {low} and {format_duration(maximum)}"
            return float(self._bad(name, f"expected a duration {want}{zero}, got "
                                   f"{_short(value)}", default))
        return seconds

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            return bool(self._bad(name, f"expected true or false, got {_kind(value)}", default))
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            return str(self._bad(name, f"expected one of {', '.join(choices)}; got {value!r}",
                                 default))
        return value

    def opt_choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        """One of `choices`, or None when the key is absent (the caller's "inherit")."""
        value = self.raw(name)
        if value is None:
            return None
        if value not in choices:
            self.report(name, f"expected {' or '.join(choices)}, got {_short(value)}")
            return None
        return str(value)

    def str_list(self, name: str, default: tuple[str, ...], *,
                 choices: tuple[str, ...] | None = None,
                 unknown: str = "unknown value", note: str = "") -> tuple[str, ...]:
        """A list of non-empty strings; with `choices`, each one of them (a value outside is
        reported as "<unknown> 'value'; expected some of ...<note>")."""
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.report(name, "expected a list of non-empty strings")
            return default
        bad = [v for v in value if choices is not None and v not in choices]
        if choices is not None and bad:
            self.report(name, f"{unknown} {bad[0]!r}; expected some of {', '.join(choices)}"
                        f"{note}")
            return tuple(v for v in value if v in choices)
        return tuple(value)

    def integer_or(self, name: str, word: str, *, minimum: int, maximum: int) -> int | None:
        """An integer between `minimum` and `maximum`, or `word` (or nothing) for None."""
        value = self.raw(name)
        if value is None or value == word:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return self.integer(name, minimum, minimum=minimum, maximum=maximum)
        self.report(name, f"expected an integer ({minimum} to {maximum}) or {word}, got "
                    f"{_short(value)}")
        return None

    def either(self, name: str, scalar: Callable[[], _T], section: Callable[[Node], _T]) -> _T:
        """A key that is a mapping (read by `section`, from `self.section(name)`) or else a
        scalar (read by `scalar`, which reads `name` itself, e.g. `shadow: true`)."""
        if isinstance(self.data.get(name), Mapping):
            return section(self.section(name))
        return scalar()

    def variant(self, name: str, branches: Mapping[str, Callable[[Node], _T]]) -> _T:
        """This mapping's keys depend on its `name` key (e.g. `from: tokens`): one of
        `branches` (the first is the default) reads the rest of them."""
        first = next(iter(branches))
        return branches[self.choice(name, first, tuple(branches))](self)

    def entries(self, name: str, *, pattern: re.Pattern[str], hint: str, limit: int,
                what: str, reserved: tuple[str, ...] = (), reserved_hint: str = "",
                empty: str = "") -> Iterator[tuple[str, Node]]:
        """A mapping from names (matching `pattern`, at most `limit`, none of `reserved`) to
        mappings (nothing: an empty one), e.g. the quota file's plans. A bad name or value is
        reported and skipped; `empty`: the problem an empty mapping is (else it is fine)."""
        node = self.section(name)
        if len(node.data) > limit:
            self.report(name, f"more than {limit} {what}")
        if empty and not node.data:
            self.report(name, empty)
        for key in list(node.data)[:limit]:
            path = node.key(str(key))
            if not isinstance(key, str) or not pattern.match(key):
                self.problems.add(ConfigError(self.file, path, hint))
                continue
            if key in reserved:
                self.problems.add(ConfigError(self.file, path, f"{key!r} {reserved_hint}"))
                continue
            value = node.raw(key)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                self.problems.add(ConfigError(self.file, path,
                                              f"expected a mapping, got {_kind(value)}"))
                continue
            yield key, Node(self.file, path, value, self.problems)

    def items(self, name: str) -> Iterator[tuple[str, Any]]:
        value = self.raw(name)
        if value is None:
            return iter(())
        if not isinstance(value, list):
            self.report(name, f"expected a list, got {_kind(value)}")
            return iter(())
        return ((f"{self.key(name)}[{i}]", v) for i, v in enumerate(value))

    def child(self, path: str, value: Any) -> Node:
        if not isinstance(value, Mapping):
            raise ConfigError(self.file, path, f"expected a mapping, got {_kind(value)}")
        return Node(self.file, path, value, self.problems)

    def done(self) -> None:
        """Refuse keys nobody read: they are typos or options this version does not have.
        Each one is reported, with the nearest known key when one is close."""
        known = sorted(self._seen)
        for name in self.data:
            if name in self._seen:
                continue
            text = str(name)
            near = difflib.get_close_matches(text, known, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else "check the spelling"
            self.report(text, f"unknown key ({hint})")

    @property
    def has_unknown_keys(self) -> bool:
        return any(name not in self._seen for name in self.data)


def parse_duration(value: Any) -> float | None:
    """Seconds, or None when `value` is not a finite duration (NaN and inf are not: a NaN
    leeway would make every time comparison false and switch the exp check off)."""
    seconds: float | None = None
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            m = DURATION_SYNTAX.match(value)
            if m:
                seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    except OverflowError:  # an integer beyond any double
        return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling in the units the reader accepts (for messages and docs)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3),
                       ("us", 1e-6)):
        count = seconds / size
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
        return f"a string ({_short(value)})"
    return f"{type(value).__name__} ({_short(value)})"
