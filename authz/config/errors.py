"""Config errors that name the file, the key and what was expected."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration file is unusable. The message names the file, the key and the problem."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")
