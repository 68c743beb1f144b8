"""Hypothesis strategies for the Authorization header a fuzzed check carries: the valid token,
none, garbage, and the near misses (cut, one character flipped, another scheme or spacing, two
tokens joined as Envoy joins duplicate headers, far too long)."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def authorization(draw: st.DrawFn, valid: str, garbage: st.SearchStrategy[str],
                  huge_max: int = 70_000) -> str | None:
    """An Authorization value around the token `valid`, or None for no header. `garbage`: what
    an arbitrary value may be on this edge; `huge_max`: the longest oversized token."""
    kind = draw(st.sampled_from(["valid", "none", "garbage", "truncated", "flipped", "scheme",
                                 "doubled", "huge"]))
    if kind == "valid":
        return f"Bearer {valid}"
    if kind == "none":
        return None
    if kind == "garbage":
        return draw(garbage)
    if kind == "truncated":
        return f"Bearer {valid[:draw(st.integers(0, len(valid) - 1))]}"
    if kind == "flipped":
        i = draw(st.integers(0, len(valid) - 1))
        c = "A" if valid[i] != "A" else "B"
        return f"Bearer {valid[:i]}{c}{valid[i + 1:]}"
    if kind == "scheme":
        scheme = draw(st.sampled_from(["Basic", "bearer", "Bearer ", "Bearer  ", "Token"]))
        return f"{scheme} {valid}"
    if kind == "doubled":
        return f"Bearer {valid},Bearer {valid}"
    return "Bearer " + "a" * draw(st.integers(8000, huge_max))
