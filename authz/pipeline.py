"""The request pipeline: one check's steps over plain values, for every protocol edge.

    path -> public | protected(model) | other | invalid        (paths.py)
    bearer token -> Identity | TokenFailure                     (tokens/)
    identity + model -> Grant | Refusal                         (quota/)
    grant -> ChargeResult, all or none                          (buckets/)
    each outcome -> Decision                                    (decision.py)

Every step but two is pure; the token (a JWKS refetch for an unknown `kid`) and the bucket
charge (the store) are awaited. An edge (the gRPC server, tests) hands in the request's path and
headers and gets a Decision, never an exception for anything a caller can send.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .buckets.store import BucketStore, StoreError
from .decision import Answers, Decision
from .log_throttle import ThrottledLog
from .paths import PathClassifier, PathKind
from .quota.resolve import Refusal, Resolver
from .tokens.identity import TokenFailure
from .tokens.verifier import Authenticator

log = logging.getLogger(__name__)


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

    async def decide(self, path: str, headers: Mapping[str, str]
                     ) -> tuple[Decision, str | None]:
        """The decision and the verified subject (for telemetry). `path`: the request's path
        as the proxy saw it (query included); `headers`: lower-case names."""
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

        grant = self.resolver.resolve(identity, target.model)
        if isinstance(grant, Refusal):
            return answers.refused(identity, grant), identity.subject
        if not grant.buckets:
            return answers.unlimited(identity, grant, cache_hit), identity.subject
        try:
            result = await self.store.charge(grant.buckets, grant.cost)
        except StoreError as e:
            self._store_failed(str(e))
            return answers.store_failed(identity, grant, cache_hit), identity.subject
        return answers.charged(identity, grant, result, cache_hit), identity.subject
