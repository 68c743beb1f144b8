"""What both protocol edges do with a check once they have its path, headers and body.

The gRPC edge (service.py) and the HTTP edge (http_edge.py) differ in how a check arrives and
how its answer is written; everything between is here, once:

- `CheckFlow.check`: the pipeline's decision, its answer, and the check's telemetry (the span
  is current while the decision is awaited, so store and JWKS spans become its children). Any
  failure becomes an explicit answer (the configured internal-error status), never an
  exception: on the gRPC edge an RPC error would reach Envoy as a bare 403, or as an allow
  under failOpen.
- `AnswerCache`: Decision -> the edge's answer, reusing what repeats. Each edge says how an
  answer is built, kept and given out again (`build`, `_base`, `_allow`, `_keep`, `_unkeep`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..decision import Decision, Headers
from ..log_throttle import ThrottledLog
from ..pipeline import CheckPipeline
from ..tokens.identity import TokenFailure

if TYPE_CHECKING:
    from ..telemetry.protocol import CheckTelemetry

log = logging.getLogger(__name__)

A = TypeVar("A")

# Bounded caches: keys are caller-influenced (subjects), so past the cap they stop growing and
# answers are built each time.
CACHE_MAX = 10_000


class AnswerCache(Generic[A]):
    """Builds an edge's answers, reusing what repeats.

    - Decisions that never vary (401s, 400s, public paths) are built once (`prebuild`), keyed
      by the Decision object's identity: Answers returns the same object for them and the cache
      keeps a reference, so the id cannot be reused.
    - An allow's identity part (upstream headers) repeats for every request of a caller: it is
      kept once (`_base`) and only the RateLimit headers are added to it (`_allow`).
    - Denies with the same status, headers and body (a caller hammering past its limit) are
      kept whole (`_keep`, given out again by `_unkeep`).
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Decision, A]] = {}
        self._allow_base: dict[tuple[Headers, tuple[str, ...]], Any] = {}
        self._denied: dict[tuple[int, str, Headers, str], Any] = {}

    # -- what each edge says ---------------------------------------------------------------
    def build(self, d: Decision) -> A:
        """The answer to `d`, built from nothing."""
        raise NotImplementedError

    def _base(self, allow: Decision) -> Any:
        """What is kept of an allow without its RateLimit headers."""
        raise NotImplementedError

    def _allow(self, base: Any, d: Decision) -> A:
        """The answer to allow `d` from its kept base: `d.response_headers` added."""
        raise NotImplementedError

    def _keep(self, answer: A) -> Any:
        return answer

    def _unkeep(self, kept: Any) -> A:
        return kept  # type: ignore[no-any-return]

    # -- the policy ------------------------------------------------------------------------
    def prebuild(self, d: Decision) -> None:
        self._by_id[id(d)] = (d, self.build(d))

    def get(self, d: Decision) -> A:
        hit = self._by_id.get(id(d))
        if hit is not None:
            return hit[1]
        if d.allowed:
            key = (d.upstream_headers, d.remove_headers)
            base = self._allow_base.get(key)
            if base is None:
                base = self._base(dataclasses.replace(d, response_headers=()))
                if len(self._allow_base) < CACHE_MAX:
                    self._allow_base[key] = base
            return self._allow(base, d)
        dkey = (d.status, d.reason, d.response_headers, d.body)
        kept = self._denied.get(dkey)
        if kept is not None:
            return self._unkeep(kept)
        answer = self.build(d)
        if len(self._denied) < CACHE_MAX:
            self._denied[dkey] = self._keep(answer)
        return answer


class CheckFlow(Generic[A]):
    """Decision, answer and telemetry of one check, for either edge (see the module doc)."""

    def __init__(self, pipeline: CheckPipeline, telemetry: CheckTelemetry | None,
                 cache: AnswerCache[A], *, no_path: Decision | None = None,
                 fixed: Iterable[Decision] = ()) -> None:
        """`no_path`: the decision for a check whose path the edge could not take (`check` with
        path None). `fixed`: the edge's own constant decisions, prebuilt with the pipeline's."""
        self.pipeline = pipeline
        self.telemetry = telemetry
        self.answers = cache
        a = pipeline.answers
        for d in (a.public(), a.other_path(), a.internal_error(), a.not_ready(),
                  *(a.unauthenticated(f) for f in TokenFailure), *fixed):
            cache.prebuild(d)
        self._no_path = no_path
        self.internal = cache.build(a.internal_error())
        status = a.internal_error().status
        self.decide_failed = ThrottledLog(
            log, logging.ERROR, f"internal error while deciding (answered {status})")
        self.respond_failed = ThrottledLog(log, logging.ERROR,
                                           "internal error while building the answer")
        self.telemetry_failed = ThrottledLog(log, logging.ERROR, "telemetry failed")

    async def check(self, path: str | None, headers: Mapping[str, str], body: bytes | None,
                    http_method: str | None = None) -> A:
        """The answer to one check. `http_method`: the HTTP edge's request method (its span is
        an HTTP server span). Never raises."""
        try:
            telemetry = self.telemetry
            if telemetry is None:
                return self._answer((await self._decide(path, headers, body))[0])[1]
            scope = telemetry.start_check(headers, http_method=http_method)
            with scope:
                decision, subject = await self._decide(path, headers, body)
                decision, answer = self._answer(decision)
                try:
                    telemetry.finish_check(scope, decision, subject, path=path or "")
                except Exception as e:
                    self.telemetry_failed(repr(e), exc_info=e)
            return answer
        except Exception as e:  # a bug above: still an explicit answer
            self.respond_failed(repr(e), exc_info=e)
            return self.internal

    async def _decide(self, path: str | None, headers: Mapping[str, str], body: bytes | None
                      ) -> tuple[Decision, str | None]:
        if path is None and self._no_path is not None:
            return self._no_path, None
        try:
            return await self.pipeline.decide(path or "", headers, body)
        except Exception as e:
            self.decide_failed(repr(e), exc_info=e)
            return self.pipeline.answers.internal_error(), None

    def _answer(self, decision: Decision) -> tuple[Decision, A]:
        try:
            return decision, self.answers.get(decision)
        except Exception as e:
            self.respond_failed(repr(e), exc_info=e)
            return self.pipeline.answers.internal_error(), self.internal
