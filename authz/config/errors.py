"""Config errors that name the file, the key and what was expected."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


class ConfigError(Exception):
    """A configuration file is unusable. The message names the file, the key and the problem."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Every problem this error stands for (itself, for a single one)."""
        return (self,)


class ConfigErrors(ConfigError):
    """Several problems, found in one pass over a file (or a config and the files it names).

    A ConfigError itself (the first problem's file and key), so callers that handle one error
    handle this one; its message has one line per problem, in file order.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        flat = tuple(e for err in errors for e in err.errors)
        if not flat:
            raise ValueError("ConfigErrors needs at least one error")
        first = flat[0]
        super().__init__(first.file, first.key, first.problem)
        self._all = flat
        self.args = ("\n".join(str(e) for e in flat),)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._all

    def __str__(self) -> str:
        return str(self.args[0])


class Problems:
    """Collects every problem found while reading a file, so one run reports them all.

    Readers record a bad value and go on with its default; a part that cannot go on (a
    required key is missing) raises, and `part()` records that and skips the rest of it.
    `raise_if_any()` ends the read: nothing half-read is ever returned.
    """

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, error: ConfigError) -> None:
        self.errors.extend(error.errors)

    @contextlib.contextmanager
    def part(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as e:
            self.add(e)

    def __len__(self) -> int:
        return len(self.errors)

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)
