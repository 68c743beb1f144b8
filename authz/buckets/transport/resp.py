"""RESP framing: commands as bytes, replies parsed by hiredis, and one-off queries.

Commands are built as bytes directly (no per-argument encoding calls on the hot path); replies
are parsed by hiredis, which turns error replies into `hiredis.ReplyError` values rather than
raising, so one bad reply never desynchronises the reply FIFO.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import hiredis

from ...errors import StoreProtocolError, StoreUnavailable

NOT_ENOUGH_DATA: Any = object()
ReplyError = hiredis.ReplyError


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def number(value: float) -> bytes:
    # repr() is the shortest string that round-trips; Lua's tonumber reads it ("1.0", "1e-05").
    return bulk(repr(value).encode())


def reader() -> hiredis.Reader:
    return hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)


def auth(username: str | None, password: str | None) -> list[bytes]:
    """The AUTH command for these credentials (none without a password)."""
    if password is None:
        return []
    if username is None:
        return [command(b"AUTH", password.encode())]
    return [command(b"AUTH", username.encode(), password.encode())]


async def query(host: str, port: int, commands: list[bytes], *, tls: ssl.SSLContext | None,
                limit: float, what: str) -> list[Any]:
    """Send `commands` on a fresh connection and return their replies (error replies included,
    as ReplyError values). For topology questions (CLUSTER SHARDS, SENTINEL ...): never on a
    data connection, so a slow answer cannot hold up a decision. Raises StoreUnavailable."""
    try:
        async with asyncio.timeout(limit):
            r, w = await asyncio.open_connection(host, port, ssl=tls,
                                                 server_hostname=host if tls else None)
            try:
                w.write(b"".join(commands))
                parse = reader()
                replies: list[Any] = []
                while len(replies) < len(commands):
                    data = await r.read(65536)
                    if not data:
                        raise StoreUnavailable(f"{what} at {host}:{port} closed the connection")
                    parse.feed(data)
                    while (reply := parse.gets()) is not NOT_ENOUGH_DATA:
                        replies.append(reply)
                return replies
            finally:
                w.transport.abort()
    except TimeoutError:
        raise StoreUnavailable(f"{what} at {host}:{port} did not answer within "
                               f"{limit:g} s") from None
    except OSError as e:
        raise StoreUnavailable(f"cannot connect to {what} at {host}:{port}: {e}") from None
    except hiredis.ProtocolError as e:
        raise StoreProtocolError(f"{what} at {host}:{port}: protocol error: {e}") from None


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
