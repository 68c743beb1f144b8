"""The service config and quota each overlay ships load with the service's own loaders, and
agree with the mesh objects around them."""

from __future__ import annotations

import json

import pytest
from deploykit import authzconfig, render
from deploykit.tools import DEPLOY

from authz.config.service_file import load_settings
from authz.quota.loader import load_quota


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_config_and_quota_load(rendered, overlay: str) -> None:
    settings, quota = authzconfig.settings_and_quota(rendered[overlay])
    assert settings.server.workers == 1
    assert settings.server.metrics_port == 9464
    assert settings.store.on_error == "deny"
    assert settings.paths.other == "deny"
    assert settings.auth.audience == "ml-inference-api"
    assert len(settings.auth.issuers) == 1 and settings.auth.issuers[0].jwks_url
    assert quota.default_plan in quota.plans
    # The pod is killed at terminationGracePeriodSeconds: drain + grace must fit inside.
    dep = render.one(rendered[overlay], "Deployment", "rate-limiter", "authz-system")
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    app_drain = settings.server.drain_delay + settings.server.shutdown_grace
    # ...and the sidecar stays up while the app drains (it carries the checks and Redis calls).
    proxy = json.loads(dep["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    assert proxy["holdApplicationUntilProxyStarts"] is True
    sidecar_drain = float(proxy["terminationDrainDuration"].removesuffix("s"))
    assert app_drain < sidecar_drain < grace


def test_overlays_differ_where_they_should(rendered) -> None:
    dev, _ = authzconfig.settings_and_quota(rendered["dev"])
    prod, _ = authzconfig.settings_and_quota(rendered["production"])
    assert dev.store.redis_url == "redis://redis.authz-system.svc.cluster.local:6379/0"
    # Production takes the URL from the required Secret; the file's value can never resolve.
    assert ".invalid:" in prod.store.redis_url
    assert dev.auth.issuers[0].issuer != prod.auth.issuers[0].issuer


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_metrics_port_is_exposed_and_annotated(rendered, overlay: str) -> None:
    settings, _ = authzconfig.settings_and_quota(rendered[overlay])
    docs = rendered[overlay]
    dep = render.one(docs, "Deployment", "rate-limiter", "authz-system")
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.server.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    svc = render.one(docs, "Service", "rate-limiter", "authz-system")
    assert {"name": "http-metrics", "port": 9464, "targetPort": "http-metrics",
            "protocol": "TCP", "appProtocol": "http"} in svc["spec"]["ports"]


@pytest.mark.parametrize("config", ["base/config/config.yaml",
                                    "overlays/production/config.yaml"])
def test_config_files_pass_the_service_checker_as_documented(config: str) -> None:
    """`authz check-config <file>` (deploy guide, "Quotas") works on the files as they lie,
    quota file included."""
    settings = load_settings(DEPLOY / config, env={})
    assert settings.quota_file is not None
    assert load_quota(settings.quota_file).plans
