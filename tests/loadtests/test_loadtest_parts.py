"""Pure-logic pieces of the load tests: h2load output parsing, percentiles, the persona mix."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from loadtests import profile
from loadtests.h2load import H2loadError, parse_output, read_log, write_timing_script
from loadtests.personas import Cast
from loadtests.population import Signer, check_request, grpc_frame

# Trimmed from a real h2load 1.52 run against the floor server.
H2LOAD_OUTPUT = """\
Application protocol: h2c
finished in 505.81ms, 1714.00 req/s, 108.57KB/s
requests: 857 total, 985 started, 857 done, 857 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 857 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 54.28KB (55587) total, 3.68KB (3771) headers (space savings 94.57%), 5.86KB (5999) data
"""


def test_parse_h2load_output() -> None:
    r = parse_output(H2LOAD_OUTPUT)
    assert r.seconds == pytest.approx(0.50581)
    assert r.rps == 1714.0
    assert (r.total, r.done, r.succeeded, r.failed, r.errored) == (857, 857, 857, 0, 0)
    assert r.data_bytes_per_request == pytest.approx(5999 / 857)
    assert parse_output(H2LOAD_OUTPUT.replace("505.81ms", "5.00s")).seconds == 5.0
    # The HTTP rows read each answer's status class (the decision's own status).
    assert r.status_codes == {"2xx": 857, "3xx": 0, "4xx": 0, "5xx": 0}
    denied = parse_output(H2LOAD_OUTPUT.replace("857 2xx, 0 3xx, 0 4xx", "800 2xx, 0 3xx, 57 4xx"))
    assert denied.status_codes["4xx"] == 57


def test_parse_h2load_garbage_is_an_error() -> None:
    with pytest.raises(H2loadError):
        parse_output("h2load: connection refused\n")


def test_percentiles_and_rate_from_log(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    # 100 requests 2 ms apart, durations 1..100 us x 10, one non-200 line ignored.
    lines = [f"{1_000_000 + i * 2000}\t200\t{(i + 1) * 10}" for i in range(100)]
    lines.append("1000001\t503\t999999")
    log.write_text("\n".join(lines) + "\n")
    r = parse_output(H2LOAD_OUTPUT)
    r.starts_us, r.durations_us = read_log(log)
    assert len(r.durations_us) == 100
    assert r.percentile_ms(50) == pytest.approx(0.5)
    assert r.percentile_ms(99) == pytest.approx(0.99)
    assert r.percentile_ms(100) == pytest.approx(1.0)
    assert r.achieved_rate() == pytest.approx(500.0)


def test_timing_script_is_an_even_schedule(tmp_path: Path) -> None:
    script = tmp_path / "t.txt"
    n = write_timing_script(script, "http://x/y", rate=500, seconds=2)
    rows = [line.split("\t") for line in script.read_text().splitlines()]
    assert n == len(rows) == 1000
    assert [float(r[0]) for r in rows[:3]] == [0.0, 2.0, 4.0]
    assert {r[1] for r in rows} == {"http://x/y"}


def test_grpc_frame_wraps_a_check_request() -> None:
    req = check_request("Bearer abc")
    framed = grpc_frame(req.SerializeToString())
    flag, length = struct.unpack(">BI", framed[:5])
    assert flag == 0 and length == len(framed) - 5
    back = external_auth_pb2.CheckRequest.FromString(framed[5:])
    headers = back.attributes.request.http.headers
    assert headers["authorization"] == "Bearer abc"
    assert headers[":path"] == "/v1/models/llama-3-8b:predict"
    assert len(headers) == 15


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


def test_cast_mix_follows_the_shares(signer: Signer) -> None:
    cast = Cast(signer, invalid_share=0.2, over_limit_share=0.1, seed=3)
    people = [cast.persona(i) for i in range(300)]
    kinds = [p.kind for p in people]
    assert 0.12 < kinds.count("invalid") / 300 < 0.28
    assert 0.05 < kinds.count("greedy") / 300 < 0.16
    # Deterministic for a seed; subjects are distinct.
    assert [p.kind for p in (cast.persona(i) for i in range(300))] == kinds
    assert len({p.subject for p in people}) == 300
    for p in people:
        if p.kind == "invalid":
            assert p.expected() == {401}
        elif p.kind == "greedy":
            assert p.expected() == {200, 429} and p.rate > 5  # faster than plan free's 5/s
        else:
            assert p.expected() == {200} and p.rate < 5
            assert p.authorization is not None and p.authorization.startswith("Bearer ")


def test_cast_rejects_impossible_shares(signer: Signer) -> None:
    with pytest.raises(ValueError):
        Cast(signer, invalid_share=0.7, over_limit_share=0.5)
    with pytest.raises(ValueError):
        Cast(signer, invalid_share=-0.1, over_limit_share=0.0)


# py-spy's raw (collapsed) format: frames root first, then the sample count.
_LOOP = ("<module> (authz/__main__.py:3);run (uvloop/__init__.py:92);"
         "Runner.run (asyncio/runners.py:118)")
_SPAN = "Tracer.start_span (opentelemetry/sdk/trace/__init__.py:1200)"
PROFILE = f"""\
{_LOOP} 50
{_LOOP};AuthorizationService.Check (authz/server/service.py:58) 30
{_LOOP};CheckFlow.check (authz/server/check_flow.py:135);{_SPAN} 10
{_LOOP};wait (asyncio/tasks.py:427) 6
Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 4
"""


def test_profile_layers_split_samples_by_what_runs_below_the_loop(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(PROFILE)
    assert profile.layers(raw) == {
        "C below the event loop (grpc core and Cython, uvloop)": 50,
        "the service (authz/)": 30,
        "OpenTelemetry (SDK and API)": 10,
        "Python called by grpc or asyncio: wait": 6,
        "other threads": 4,
    }
    summary = profile.summarize(raw)
    assert summary.startswith("100 samples")
    assert "   50.0%  C below the event loop" in summary
