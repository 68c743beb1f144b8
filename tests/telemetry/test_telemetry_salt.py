"""Subject hashes are never unsalted: an empty salt becomes a random per-process one."""

from __future__ import annotations

import dataclasses
import hashlib

from authz.config.settings import ServerSettings, Settings, TelemetrySettings
from authz.telemetry import Telemetry


def telemetry(salt: str) -> Telemetry:
    settings = Settings(server=ServerSettings(metrics_port=0),
                        telemetry=dataclasses.replace(TelemetrySettings(), subject_salt=salt))
    return Telemetry.from_settings(settings, environ={"OTEL_TRACES_EXPORTER": "none"},
                                   install_global=False)


def test_configured_salt_is_used_and_stable() -> None:
    a, b = telemetry("pepper"), telemetry("pepper")
    expected = hashlib.sha256(b"pepper\0alice").hexdigest()[:16]
    assert a.subject_hash("alice") == b.subject_hash("alice") == expected


def test_empty_salt_is_replaced_by_a_random_one() -> None:
    a, b = telemetry(""), telemetry("")
    unsalted = hashlib.sha256(b"\0alice").hexdigest()[:16]
    assert a.subject_hash("alice") != unsalted
    assert a.subject_hash("alice") != b.subject_hash("alice")
    assert a.subject_hash("alice") == a.subject_hash("alice")
