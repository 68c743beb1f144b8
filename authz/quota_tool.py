"""`authz quota show` and `authz quota reset`: one identity's buckets, as Redis holds them.

Levels are computed the way token_bucket.lua computes them, with Redis's clock (TIME on the
node that holds the buckets) and the service's own quota file (capacity and rate per limit):
`level = min(capacity, tokens + elapsed x rate)`, a bucket without a key being full. Which
buckets: every limit of every plan (or of `--plan`), since without the caller's token the plan
its claim selects is not known; plans with shared limits need the scope claim's value
(`--claim org=acme`), which places the caller's own buckets too.

A reset deletes the keys (a missing bucket is a full one) and announces it on the resets stream
(buckets/resets.py), so every replica's local deny cache forgets the identity within ~1 s.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .buckets import resets
from .buckets.redis import RedisBucketStore
from .errors import InvalidValue, StoreError
from .quota.model import BUILTIN_PLANS, Limit, Plan, Quota
from .quota.resolve import bucket_key, scope_key
from .tokens.verifier import identity_key


@dataclass(frozen=True, slots=True)
class BucketView:
    plan: str
    limit: str
    scope: str  # "" for the caller's own bucket, else "<claim>=<value>" (shared)
    key: str
    stored: bool  # False: no key, i.e. full
    level: float
    capacity: float
    rate: str  # as configured: "5 per 1s"
    seconds_to_full: float


@dataclass(frozen=True, slots=True)
class Selection:
    """Which identity, which plans, and the scope claims that place shared buckets."""

    issuer: str
    subject: str
    plan: str | None
    claims: Mapping[str, str]

    @property
    def identity(self) -> str:
        return identity_key(self.issuer, self.subject)


def applying_plan(quota: Quota, sel: Selection) -> tuple[str, str]:
    """(plan, why) as far as it can be told without a token."""
    override = quota.overrides.get((sel.issuer, sel.subject))
    if override is not None:
        return override, "an override in the quota file"
    claimed = sel.claims.get(quota.plan_claim)
    if claimed is not None and claimed in quota.plans and claimed not in BUILTIN_PLANS:
        return claimed, f"--claim {quota.plan_claim}={claimed}"
    return quota.default_plan, ("the default plan (the caller's token may name another in "
                                f"its {quota.plan_claim!r} claim)")


def _limits(plan: Plan) -> list[Limit]:
    seen: dict[str, Limit] = {lim.name: lim for lim in plan.limits}
    for rule in plan.models or ():
        for lim in rule.limits:
            seen.setdefault(lim.name, lim)
    return list(seen.values())


def buckets_of(quota: Quota, sel: Selection, *, shared: bool = True
               ) -> tuple[list[tuple[Plan, Limit, str, str]], list[str]]:
    """(plan, limit, key without prefix, scope label) of every bucket selected, and notes on
    what could not be placed."""
    names = [sel.plan] if sel.plan else [n for n in quota.plans if n not in BUILTIN_PLANS]
    out: list[tuple[Plan, Limit, str, str]] = []
    notes: list[str] = []
    for name in names:
        plan = quota.plans.get(name)
        if plan is None:
            raise KeyError(f"plan {name!r} is not in the quota file "
                           f"(plans: {', '.join(sorted(quota.plans))})")
        tag = None
        label = ""
        if plan.scope is not None:
            value = sel.claims.get(plan.scope)
            if value is None:
                notes.append(f"plan {name!r} has limits shared by the {plan.scope!r} claim: "
                             f"give --claim {plan.scope}=VALUE to see its buckets")
                continue
            tag = scope_key(sel.issuer, plan.scope, value)
            label = f"{plan.scope}={value}"
        for limit in _limits(plan):
            if limit.scope and not shared:
                continue
            out.append((plan, limit, bucket_key(plan, limit, sel.identity, tag),
                        label if limit.scope else ""))
    return out, notes


def _per(limit: Limit) -> str:
    from .config.yaml_reader import format_duration

    return f"{limit.count:g} per {format_duration(limit.per)}"


async def show(store: RedisBucketStore, quota: Quota, sel: Selection) -> dict[str, Any]:
    selected, notes = buckets_of(quota, sel)
    views: list[BucketView] = []
    by_tag: dict[str, list[tuple[Plan, Limit, str, str]]] = {}
    for item in selected:
        by_tag.setdefault(item[2].partition("}")[0], []).append(item)
    for items in by_tag.values():
        # TIME and the GETs on the node holding these keys (one hash tag: one node), together.
        first = items[0][2]
        now_reply, *values = await asyncio.gather(
            store.command(first, b"TIME"),
            *(store.command(key, b"GET", (store.prefix + key).encode())
              for _, _, key, _ in items))
        now = int(now_reply[0]) + int(now_reply[1]) / 1e6
        for (plan, limit, key, label), raw in zip(items, values, strict=True):
            level = limit.burst
            stored = raw is not None
            if stored:
                tokens_text, _, updated_us = raw.decode().partition(" ")
                tokens, updated = float(tokens_text), float(updated_us) / 1e6
                level = min(limit.burst, tokens + max(0.0, now - updated) * limit.rate)
            views.append(BucketView(plan.name, limit.name, label, store.prefix + key, stored,
                                    level, limit.burst, _per(limit),
                                    (limit.burst - level) / limit.rate))
    applies, why = applying_plan(quota, sel)
    return {"issuer": sel.issuer, "subject": sel.subject, "identity_hash": sel.identity,
            "applies": {"plan": applies, "because": why}, "buckets": [asdict(v) for v in views],
            "notes": notes}


async def reset(store: RedisBucketStore, quota: Quota, sel: Selection, *, shared: bool
                ) -> dict[str, Any]:
    """Delete the selected buckets (shared ones only with `shared`) and tell every replica."""
    selected, notes = buckets_of(quota, sel, shared=shared)
    deleted = 0
    for key in [k for _, _, k, _ in selected]:
        deleted += int(await store.command(key, b"DEL", (store.prefix + key).encode()))
    markers = [sel.identity]
    if shared:
        markers += sorted({k.partition("}")[0].lstrip("{") for _, lim, k, _ in selected
                           if lim.scope})
    stream_id = await resets.publish(store, markers)
    return {"issuer": sel.issuer, "subject": sel.subject, "identity_hash": sel.identity,
            "keys": [store.prefix + k for _, _, k, _ in selected], "deleted": deleted,
            "announced": stream_id.decode(), "notes": notes}


def render_show(report: Mapping[str, Any]) -> str:
    lines = [f"{report['issuer']} {report['subject']} (identity {report['identity_hash']}); "
             f"plan {report['applies']['plan']!r} applies by {report['applies']['because']}"]
    rows = [("plan", "limit", "shared by", "level", "capacity", "rate", "full in", "stored")]
    for b in report["buckets"]:
        level = math.floor(b["level"] * 100) / 100
        rows.append((b["plan"], b["limit"], b["scope"] or "-", f"{level:g}",
                     f"{b['capacity']:g}", b["rate"], f"{b['seconds_to_full']:.1f}s",
                     "yes" if b["stored"] else "no (full)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def render_reset(report: Mapping[str, Any]) -> str:
    lines = [f"reset {report['issuer']} {report['subject']}: {report['deleted']} of "
             f"{len(report['keys'])} bucket key(s) held tokens and were deleted (a missing "
             f"bucket is full); every replica's deny cache forgets them within ~1 s "
             f"(resets stream id {report['announced']})"]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def parse_claims(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidValue(f"--claim expects NAME=VALUE, got {item!r}")
        out[name] = value
    return out


__all__ = ["BucketView", "Selection", "StoreError", "parse_claims", "render_reset",
           "render_show", "reset", "show"]
