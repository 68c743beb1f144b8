"""Collecting every problem of a file, so one run reports them all (ConfigError itself lives
in `authz.errors`, with the rest of the error hierarchy)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import ConfigError, ConfigErrors


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
