"""store.redis_url parsing (authz/config/redis_url.py): the forms the README lists, read as
redis-py's `from_url` reads them, and any text answered with a RedisAddress or a clear
InvalidValue."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.config.redis_url import RedisAddress, parse_redis_url
from authz.errors import InvalidValue


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://localhost", RedisAddress(host="localhost")),
    ("redis://h:1234/3", RedisAddress(host="h", port=1234, db=3)),
    # percent-encoded credentials; a user without a password and the reverse
    ("redis://al%40ice:p%3Ass@h/0", RedisAddress(host="h", username="al@ice", password="p:ss")),
    ("redis://:secret@h", RedisAddress(host="h", password="secret")),
    ("redis://bob@h", RedisAddress(host="h", username="bob")),
    # the query's db wins over the path's; a password in the query
    ("redis://h/1?db=4&password=pw", RedisAddress(host="h", db=4, password="pw")),
    ("redis://[::1]:6380/2", RedisAddress(host="::1", port=6380, db=2)),
    ("redis://h/", RedisAddress(host="h")),
    ("unix:///run/redis.sock?db=2&password=x",
     RedisAddress(path="/run/redis.sock", db=2, password="x")),
])
def test_accepted_forms(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


def test_tls_options() -> None:
    address = parse_redis_url("rediss://h:6380/0?ssl_cert_reqs=optional&ssl_check_hostname=no")
    assert address.tls is not None and not address.tls.check_hostname
    assert parse_redis_url("rediss://h").tls.check_hostname  # type: ignore[union-attr]


@pytest.mark.parametrize(("url", "message"), [
    ("redis://h/zero", "names the database: a number"),
    ("redis://h?db=one", "db must be a number"),
    ("redis://h:70000", "Port out of range"),
    ("redis://h?socket_timeout=1", "unsupported option"),
    ("redis://:pw@h:6379/x", "a number"),
])
def test_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=message) as info:
        parse_redis_url(url)
    assert "pw" not in str(info.value)  # the password never reaches the message


_URLISH = st.builds(
    lambda scheme, rest: scheme + rest,
    st.sampled_from(["redis://", "rediss://", "unix://", "http://", ""]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
    | st.from_regex(r"([a-z%:@]{0,8}@)?[a-z0-9.\[\]:]{0,20}(:[0-9]{0,6})?(/[0-9a-z%]{0,4})?"
                    r"(\?[a-z_=&0-9%]{0,30})?", fullmatch=True),
)


@given(_URLISH)
def test_any_text_is_an_address_or_a_clear_error(url: str) -> None:
    try:
        address = parse_redis_url(url)
    except InvalidValue as e:
        assert str(e).startswith("store.redis_url")
        return
    assert address.path or address.host
    assert 0 <= address.port <= 65535 and address.db >= 0
