"""`authz demo` as a new user runs it: start it, paste the printed lines, press Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authz.demo.processes import clean_env, free_port

pytestmark = pytest.mark.envoy

START_TIMEOUT = 30.0


def _wait_for_token(log: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        match = re.search(r"^export TOKEN=(\S+)$", text, re.MULTILINE)
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"demo exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    raise AssertionError(f"demo printed no token within {START_TIMEOUT} s:\n{log.read_text()}")


def _commands(text: str) -> dict[str, str]:
    """The printed shell lines, keyed by the status their comment announces."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^# (\d{3}): ", line)
        if match and i + 1 < len(lines):
            out[match.group(1)] = lines[i + 1]
    return out


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed with its `demo` extra into a fresh venv,
    as a user installs it: no source tree, no .tools next to it. Returns the venv."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root),
                    str(REPO)], check=True, timeout=300)
    [wheel] = root.glob("authz-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"{wheel}[demo]"], check=True, timeout=600)
    # What `make install` does too: xds-protos overwrites opentelemetry-proto's files.
    from importlib.metadata import version

    subprocess.run([*pip, "--force-reinstall", "--no-deps",
                    f"opentelemetry-proto=={version('opentelemetry-proto')}"],
                   check=True, timeout=300)
    return venv


@pytest.mark.parametrize("install", ["checkout", "wheel"])
def test_demo_prints_working_curl_lines_and_stops_cleanly(
        envoy_bin: Path, tmp_path: Path, install: str,
        request: pytest.FixtureRequest) -> None:
    # The demo's instructions are curl lines: run them as a user would (make test installs it).
    assert shutil.which("curl"), "curl is missing (scripts/install-test-tools.sh installs it)"
    port = free_port()
    log = tmp_path / "demo.out"
    if install == "checkout":
        command = [sys.executable, "-m", "authz"]
        env = clean_env({"ENVOY_BIN": str(envoy_bin), "PYTHONUNBUFFERED": "1"})
        cwd = None
    else:
        # From the wheel, run elsewhere: Envoy is found on PATH, nothing from this checkout.
        venv: Path = request.getfixturevalue("installed_wheel")
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "envoy").symlink_to(envoy_bin)
        command = [str(venv / "bin" / "authz")]
        env = {k: v for k, v in clean_env({"PYTHONUNBUFFERED": "1"}).items()
               if k not in ("ENVOY_BIN", "PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        cwd = tmp_path
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*command, "demo", "--http-port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
    try:
        token = _wait_for_token(log, proc)
        text = log.read_text()
        assert "DEVELOPMENT ONLY" in text
        commands = _commands(text)
        assert set(commands) == {"200", "401", "403", "429"}, text

        def run(command: str) -> str:
            result = subprocess.run(
                ["bash", "-c", command],
                env={**os.environ, "TOKEN": token},
                capture_output=True,
                text=True,
                timeout=30,
            )
            return result.stdout

        assert run(commands["200"]).startswith("HTTP/1.1 200"), run(commands["200"])
        denied = run(commands["401"])
        assert denied.startswith("HTTP/1.1 401") and "www-authenticate: Bearer" in denied
        assert run(commands["403"]).startswith("HTTP/1.1 403")
        statuses = run(commands["429"]).split()
        assert statuses[0] == "200" and statuses[-1] == "429", statuses
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            status = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
    text = log.read_text()
    assert status == 0, text
    assert text.rstrip().endswith("authz demo: stopped."), text
    # Envoy went with it: nothing listens on the demo's port any more.
    result = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/health"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.stdout == "000"
