"""Every error this package raises on purpose, under one root.

    AuthzError
    ├── ConfigError            a config or quota file (or the environment) is unusable:
    │   │                      carries file, key and problem
    │   ├── ConfigErrors       several of them, found in one pass
    │   └── TelemetryConfigError   an OTEL_* variable (file "environment", key the variable)
    ├── InvalidValue           a value that cannot be used (a URL); the reader adds file and key
    │   └── SidecarConfigError a parameter of the generated Envoy sidecar config
    ├── StoreError             the bucket store could not answer
    │   ├── StoreTimeout       no answer within store.timeout
    │   ├── StoreUnavailable   not connected, connection lost, connection refused
    │   └── StoreProtocolError an answer we cannot use (an error reply, a malformed reply)
    ├── KeySourceError         an issuer's keys could not be loaded (file or URL named)
    ├── StartupError           the process cannot serve (port taken, keys, store)
    ├── EnvoyNotFound          no Envoy binary for `authz demo` / the e2e tools
    └── ProcessError           a child process of `authz demo` did not start or died

The CLI catches `AuthzError` once and exits 2 with its message; anything else is a bug and
keeps its traceback. Nothing here imports the rest of the package: it sits at the bottom.
"""

from __future__ import annotations

from collections.abc import Sequence

# Exit status for "could not start" (bad config, keys, store, port): distinct from a crash, so a
# supervisor (ours, or Kubernetes' restart policy read by a human) does not mistake one for the
# other; our worker supervisor does not restart a worker that exits with it.
EXIT_STARTUP = 2


class AuthzError(Exception):
    """Root of every error raised on purpose (the message says what to do)."""


class ConfigError(AuthzError):
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
            raise TypeError("ConfigErrors needs at least one error")
        first = flat[0]
        super().__init__(first.file, first.key, first.problem)
        self._all = flat
        self.args = ("\n".join(str(e) for e in flat),)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._all

    def __str__(self) -> str:
        return str(self.args[0])


class TelemetryConfigError(ConfigError):
    """An OTEL_* variable has a value we cannot use. The problem names the variable and what
    it accepts (e.g. "OTEL_TRACES_EXPORTER='x': unknown exporter ...")."""

    def __init__(self, problem: str, variable: str = "") -> None:
        super().__init__("environment", variable, problem)


class InvalidValue(AuthzError):
    """A value that cannot be used as given (e.g. a Redis URL). Whoever read it from a file
    reports it as a ConfigError naming the file and the key."""


class SidecarConfigError(InvalidValue):
    """A parameter cannot be turned into a valid Envoy sidecar configuration (authz.mesh)."""


class StoreError(AuthzError):
    """The store could not answer. `error_type` is the bounded metric label for it."""

    error_type = "error"


class StoreTimeout(StoreError):
    """No answer within store.timeout (the connection is dropped: its late replies would
    belong to calls that already failed)."""

    error_type = "timeout"


class StoreUnavailable(StoreError):
    """Not connected: refused, lost, closed, not started, or between reconnect attempts."""

    error_type = "connection"


class StoreProtocolError(StoreError):
    """An answer that cannot be used: an error reply, a reply nobody asked for, a malformed
    reply from the script."""

    error_type = "error"


class KeySourceError(AuthzError):
    """Keys could not be loaded; the message names the issuer and the file or URL."""


class StartupError(AuthzError):
    """The process cannot serve with this configuration; the message says why."""


class EnvoyNotFound(AuthzError):
    """No usable Envoy binary; the message says how to get one."""


class ProcessError(AuthzError):
    """A child did not start (or died); the message carries the end of its log."""
