"""Everything a server process runs on, validated by one function that `authz serve` and
`authz check-config` both call, so a file that passes the checker is a file the server starts on.

What it reads: the config file (or the embedded defaults), the environment overrides
(AUTHZ_REDIS_URL, AUTHZ_SUBJECT_SALT), the quota file it names, the issuers' local key files
(jwks_file / pem_file), and the OTEL_* variables. Every problem found in all of them is
reported together; a reference to another file names the key that refers to it.
Not checked here: what only exists at run time (JWKS URLs, Redis, free ports).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config.problems import Problems
from .config.service_file import load_settings, server_port_problems
from .config.settings import Settings
from .errors import ConfigError, KeySourceError
from .quota import load_quota
from .quota.model import Quota
from .tokens.keys import read_key_file


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    settings: Settings
    quota: Quota


def load_service_config(path: str | Path | None, *, env: Mapping[str, str],
                        dev: bool = False, server: Mapping[str, Any] | None = None
                        ) -> ServiceConfig:
    """The validated configuration, or ConfigError(s) naming every problem.

    `server`: command-line overrides of `server.*` (grpc_port, http_port, metrics_port,
    workers).
    `dev`: `serve --dev`, where the development signer stands in for configured issuers.
    """
    file = str(path) if path is not None else "<defaults>"
    problems = Problems()
    settings = load_settings(path, env=env)  # raises: nothing below makes sense without it
    if server:
        settings = dataclasses.replace(
            settings, server=dataclasses.replace(settings.server, **server))
        for key, problem in server_port_problems(settings.server):
            problems.add(ConfigError("<command line>", f"server.{key}", problem))
    quota: Quota | None = None
    with problems.part():
        quota = load_quota(settings.quota_file, referrer=(file, "quota_file"))
    if not settings.auth.issuers and not dev:
        problems.add(ConfigError(file, "auth.issuers", "no issuers configured: list the "
                                 "identity providers whose tokens are trusted (see README "
                                 "'Configuration reference'), or try the service with "
                                 "`authz serve --dev`"))
    for i, issuer in enumerate(settings.auth.issuers):
        for key, key_path, pem in (("jwks_file", issuer.jwks_file, False),
                                   ("pem_file", issuer.pem_file, True)):
            if key_path is None:
                continue
            try:
                read_key_file(key_path, key_path, pem=pem)
            except KeySourceError as e:
                problems.add(ConfigError(file, f"auth.issuers[{i}].{key}", str(e)))
    if not settings.store.redis_url and settings.server.workers > 1 and not dev:
        problems.add(ConfigError(
            file, "server.workers",
            f"is {settings.server.workers} but store.redis_url is empty: the in-memory store "
            "keeps buckets per process, so every worker would grant the full limit. Configure "
            "store.redis_url, or use --workers 1."))
    with problems.part():
        _check_telemetry_environment(settings, env)
    problems.raise_if_any()
    assert quota is not None
    return ServiceConfig(settings, quota)


def _check_telemetry_environment(settings: Settings, env: Mapping[str, str]) -> None:
    from .telemetry.config import TelemetryConfig, TelemetryConfigError

    try:
        TelemetryConfig.from_env(settings, env)
    except TelemetryConfigError as e:
        raise ConfigError("environment", "", str(e)) from None
