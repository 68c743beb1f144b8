"""The request pipeline: one check's steps over plain values, for every protocol edge.

    path -> public | protected(model) | other | invalid        (paths.py)
    bearer token -> Identity | TokenFailure                     (tokens/)
    [an LLM route: the model from the body]                     (quota/costs.py)
    identity + model -> Grant | Refusal                         (quota/)
    [a cost rule: the cost from the body, 400 / 413]            (quota/costs.py)
    grant -> ChargeResult, all or none                          (buckets/)
    each outcome -> Decision                                    (decision.py)

Every step but two is pure; the token (a JWKS refetch for an unknown `kid`) and the bucket
charge (the store) are awaited. An edge (the gRPC and HTTP servers, tests) hands in the
request's path and headers (and its body, when the provider sends it) and gets a Decision,
never an exception for anything a caller can send.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .buckets.store import BucketStore, StoreError
from .decision import Answers, Decision
from .log_throttle import ThrottledLog
from .paths import PathClassifier, PathKind, valid_model_name
from .quota.costs import Unpriced, model_of, price
from .quota.resolve import Refusal, Resolver
from .tokens.identity import TokenFailure
from .tokens.verifier import Authenticator

log = logging.getLogger(__name__)

# Envoy's ext_authz filter sets this on the check when with_request_body allows a partial
# message and the body was cut at max_request_bytes (envoy ext_authz docs,
# allow_partial_message): a cut body cannot be counted.
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"


class CheckPipeline:
    """Decides checks. `ready` is set by the server once keys are loaded (and cleared when it
    shuts down): until then protected paths get 503 not_ready. `resolver` is replaced whole on a
    quota reload; a check in flight keeps the one it started with."""

    def __init__(self, *, answers: Answers, paths: PathClassifier,
                 authenticator: Authenticator, resolver: Resolver,
                 store: BucketStore) -> None:
        self.answers = answers
        self.paths = paths
        self.authenticator = authenticator
        self.resolver = resolver
        self.store = store
        self.ready = False
        self._store_failed = ThrottledLog(log, logging.WARNING, "bucket store failed")

    async def decide(self, path: str, headers: Mapping[str, str], body: bytes | None = None
                     ) -> tuple[Decision, str | None]:
        """The decision and the verified subject (for telemetry). `path`: the request's path
        as the proxy saw it (query included); `headers`: lower-case names; `body`: the request
        body when the provider includes it (None when it does not)."""
        answers = self.answers
        if not path:
            return answers.invalid_request("missing_http_attributes"), None
        target = self.paths.classify(path)
        kind = target.kind
        if kind is PathKind.INVALID:
            return answers.invalid_request(target.reason), None
        if kind is PathKind.PUBLIC:
            return answers.public(), None
        if kind is PathKind.OTHER:
            return answers.other_path(), None
        if not self.ready:
            return answers.not_ready(), None

        authorization = headers.get("authorization")
        identity = self.authenticator.authenticate_cached(authorization)
        cache_hit = identity is not None
        if identity is None:
            verified = await self.authenticator.authenticate(authorization)
            if isinstance(verified, TokenFailure):
                return answers.unauthenticated(verified), None
            identity = verified

        model = target.model
        if target.protocol == "openai":
            # An OpenAI-compatible route names its model in the body, not the path.
            named = model_of(body)
            if named is None:
                # A cut body is no JSON: say why rather than "no model".
                reason = ("body_partial" if headers.get(PARTIAL_BODY_HEADER) == "true"
                          else "body_model_missing")
                return answers.invalid_request(reason), identity.subject
            if not valid_model_name(named):
                return answers.invalid_request("invalid_model_name"), identity.subject
            model = named
        grant = self.resolver.resolve(identity, model)
        if isinstance(grant, Refusal):
            return answers.refused(identity, grant), identity.subject
        if not grant.buckets:
            return answers.unlimited(identity, grant, cache_hit), identity.subject
        cost = grant.cost
        if grant.cost_rule is not None:
            priced = price(grant.cost_rule, body,
                           partial=headers.get(PARTIAL_BODY_HEADER) == "true",
                           protocol=target.protocol)
            if isinstance(priced, Unpriced):
                return answers.unpriced(grant, priced.reason), identity.subject
            cost = priced.cost
            for spec, limit in zip(grant.buckets, grant.limits, strict=True):
                if cost > spec.capacity and not spec.per_request and not spec.shadow:
                    return answers.too_large(grant, cost, limit), identity.subject
        try:
            result = await self.store.charge(grant.buckets, cost)
        except StoreError as e:
            self._store_failed(str(e))
            return answers.store_failed(identity, grant, cache_hit), identity.subject
        return answers.charged(identity, grant, result, cache_hit), identity.subject
