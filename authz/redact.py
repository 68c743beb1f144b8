"""Secrets out of URLs before they reach a message, a log line or an exception.

At the bottom of the package (it imports nothing of it): the config loader, the Redis URL
parser, the JWKS fetcher and the effective-configuration log line all redact with this.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

MASK = "***"
# URL query parameters whose values are secrets (redis-py accepts ?password=...).
SECRET_QUERY_PARAMS = frozenset(
    {"password", "pass", "pwd", "secret", "token", "access_token", "api_key", "apikey", "key",
     "sig", "signature"}
)


def redact_url(url: str, *, drop_userinfo: bool = False) -> str:
    """The URL with its password (and secret-looking query values) replaced by ***.

    A lone userinfo (`https://TOKEN@host`) is often a credential itself: it is masked too.
    `drop_userinfo`: remove user and password altogether (a URL we still fetch from shows
    where, not who)."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        if drop_userinfo:
            netloc = hostport
        else:
            netloc = f"{user}:{MASK}@{hostport}" if sep else f"{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{k}={MASK if k.lower() in SECRET_QUERY_PARAMS else v}" for k, v in pairs
        )
    # Not urlunsplit: it drops the empty authority of `unix:///path`.
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out
