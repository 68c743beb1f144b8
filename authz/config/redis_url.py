"""`store.redis_url` -> where and how to connect, with errors that say what is wrong.

Pure parsing (the standard library's urllib.parse, the URL forms redis-py's `from_url`
accepts, then our checks): the config loader reports a bad URL naming the key, and the Redis
store connects to the RedisAddress it yields. redis-py's own `parse_url` did this before; its
import alone cost the service 6 MB of RSS (`authz serve --dev` after start: 73.2 MB with it,
67.2 MB without) and ~0.2 s of start-up (`python -X importtime`), for one function the rest of
the service never calls.

redis://[[user]:password@]host[:port][/db], rediss://... (TLS), unix://[[user]:password@]/path
[?db=N&password=...]. The query accepts `db`, `password` and the TLS options `ssl_cert_reqs`
(none|optional|required), `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_check_hostname`;
anything else is refused rather than silently ignored.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from ..errors import InvalidValue
from ..redact import redact_url as _redact

DEFAULT_PORT = 6379
_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                "ssl_check_hostname")
_KNOWN = {"host", "port", "path", "db", "username", "password", *_TLS_OPTIONS}
# Query values read as booleans, as redis-py reads them (anything else: true).
_FALSE = ("0", "F", "FALSE", "N", "NO")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
              "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""  # unix socket; set instead of host/port
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @property
    def display(self) -> str:
        """Where, for messages: never the password."""
        if self.path:
            return f"unix://{self.path}" + (f"?db={self.db}" if self.db else "")
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def _url_parts(url: str) -> dict[str, Any]:
    """The URL's parts as connection keywords (host, port, path, db, username, password and
    the query's options); ValueError when a part is malformed (a port out of range, a
    non-integer db)."""
    parsed = urlparse(url)
    out: dict[str, Any] = {}
    for name, values in parse_qs(parsed.query).items():
        value = values[0]  # parse_qs has percent-decoded it already
        if name == "db":
            if not value.isdigit():
                raise ValueError(f"db must be a number (got {value!r})")
            out[name] = int(value)
        elif name == "ssl_check_hostname":
            out[name] = value.upper() not in _FALSE if value else None
        else:
            out[name] = value
    if parsed.username:
        out["username"] = unquote(parsed.username)
    if parsed.password:
        out["password"] = unquote(parsed.password)
    if parsed.scheme == "unix":
        if parsed.path:
            out["path"] = unquote(parsed.path)
        return out
    if parsed.hostname:
        out["host"] = unquote(parsed.hostname)
    if parsed.port:  # raises ValueError out of range
        out["port"] = parsed.port
    db = unquote(parsed.path).strip("/")
    if db and "db" not in out:  # /N names the database unless the query did
        if not db.isdigit():
            raise ValueError(f"the path names the database: a number (got {db!r})")
        out["db"] = int(db)
    return out


def parse_redis_url(url: str) -> RedisAddress:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise InvalidValue(f"store.redis_url must start with redis://, rediss:// or unix:// "
                         f"(got {_redact(url)!r})")
    try:
        kwargs = _url_parts(url)
    except ValueError as e:
        raise InvalidValue(f"store.redis_url {_redact(url)!r} is invalid: {e}") from None
    unknown = sorted(set(kwargs) - _KNOWN)
    if unknown:
        raise InvalidValue(f"store.redis_url {_redact(url)!r}: unsupported option(s) "
                         f"{', '.join(unknown)}; supported: db, password, "
                         f"{', '.join(_TLS_OPTIONS)}")
    db = kwargs.get("db", 0)
    if db < 0:
        raise InvalidValue(f"store.redis_url {_redact(url)!r}: db must be >= 0")
    common: dict[str, Any] = {"db": db, "username": kwargs.get("username"),
                              "password": kwargs.get("password")}
    if scheme == "unix":
        if not kwargs.get("path"):
            raise InvalidValue(f"store.redis_url {_redact(url)!r}: no socket path "
                             "(expected unix:///path/to/redis.sock)")
        if any(k in kwargs for k in _TLS_OPTIONS):
            raise InvalidValue(f"store.redis_url {_redact(url)!r}: TLS options need rediss://")
        return RedisAddress(path=kwargs["path"], **common)
    if not kwargs.get("host"):
        raise InvalidValue(f"store.redis_url {_redact(url)!r}: no host "
                         "(expected redis://host:port/db)")
    tls = _tls_context(url, kwargs) if scheme == "rediss" else None
    if tls is None and any(k in kwargs for k in _TLS_OPTIONS):
        raise InvalidValue(f"store.redis_url {_redact(url)!r}: TLS options need rediss://")
    return RedisAddress(host=kwargs["host"], port=kwargs.get("port", DEFAULT_PORT), tls=tls,
                        **common)


def _tls_context(url: str, kwargs: dict[str, Any]) -> ssl.SSLContext:
    reqs_name = str(kwargs.get("ssl_cert_reqs", "required")).lower()
    if reqs_name not in _CERT_REQS:
        raise InvalidValue(f"store.redis_url {_redact(url)!r}: ssl_cert_reqs must be one of "
                         f"none, optional, required (got {reqs_name!r})")
    try:
        ctx = ssl.create_default_context(cafile=kwargs.get("ssl_ca_certs"))
        if "ssl_certfile" in kwargs:
            ctx.load_cert_chain(kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"))
    except (OSError, ssl.SSLError) as e:
        raise InvalidValue(f"store.redis_url {_redact(url)!r}: cannot load TLS files: {e}"
                           ) from None
    check_hostname = kwargs.get("ssl_check_hostname", reqs_name == "required")
    ctx.check_hostname = bool(check_hostname) and reqs_name != "none"
    ctx.verify_mode = _CERT_REQS[reqs_name]
    return ctx


def parse_endpoint(text: str) -> tuple[str, int]:
    """"host:port" (a cluster seed, a sentinel; "[::1]:6379" for IPv6) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidValue(f"expected host:port, got {text!r}")
    return host, int(port)
