"""What the server and the stores ask of telemetry: `CheckTelemetry`.

`authz.telemetry.Telemetry` implements it; the server (authz/server/) and `build_store` are
typed against this protocol only, so they depend on these few calls and nothing else of the
OpenTelemetry setup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from authz.decision import Decision
    from authz.telemetry.check import CheckScope


class CheckTelemetry(Protocol):
    """Telemetry as the service uses it. Every method is for the event-loop thread and never
    raises (see authz/telemetry/__init__.py for the calling pattern)."""

    def start_check(self, headers: Mapping[str, str], *,
                    http_method: str | None = None) -> CheckScope:
        """First thing in the Check handler, with the request's HTTP headers; the HTTP edge
        passes the check request's method (an HTTP server span, the HTTP duration histogram).
        """
        ...

    def finish_check(self, scope: CheckScope, decision: Decision, subject: str | None = None,
                     *, path: str = "") -> None:
        """Once per scope, with the decision made (inside `with scope:` or after it)."""
        ...

    def observe_store_call(self, duration_s: float, ok: bool, error_type: str = "error") -> None:
        """One bucket-store call that reached the store."""
        ...

    def config_reloaded(self, ok: bool) -> None: ...

    def tracer(self, name: str) -> Tracer | None:
        """The tracer for check-path spans (the Redis store's), None when tracing is off."""
        ...

    def register_token_cache(self, hits: Callable[[], int], misses: Callable[[], int],
                             entries: Callable[[], int]) -> None: ...

    def register_jwks(self, counts: Callable[[], Mapping[tuple[str, str], int]]) -> None: ...
