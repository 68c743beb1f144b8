"""Fixtures for the container-image suite (marker `image`): engine, one build, a container.

See engines.py for how docker and podman/buildah are driven.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .engines import (
    BUILD_TIMEOUT,
    SCRIPTS,
    Container,
    DockerEngine,
    Engine,
    PodmanEngine,
    docker_answers,
    must,
)

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="session")
def engine() -> Engine:
    forced = os.environ.get("AUTHZ_IMAGE_ENGINE", "")
    if forced == "docker" or (not forced and docker_answers()):
        return DockerEngine()
    if forced not in ("", "podman"):
        pytest.fail(f"AUTHZ_IMAGE_ENGINE={forced!r}: expected docker or podman", pytrace=False)
    missing = [t for t in ("podman", "buildah") if shutil.which(t) is None]
    if missing:
        # Fail, not skip: a suite that silently skips its image tests proves nothing.
        pytest.fail(f"no docker daemon and no {' / '.join(missing)}: apt-get install podman "
                    "buildah debootstrap (or deselect with -m 'not image')", pytrace=False)
    return PodmanEngine()


@pytest.fixture(scope="session")
def image(engine: Engine) -> Iterator[str]:
    """The repository's image, built once per session through scripts/image/build.sh and
    removed afterwards (the cached base image stays)."""
    tag = f"localhost/authz-image-test:{uuid.uuid4().hex[:10]}"
    argv = ["bash", str(SCRIPTS / "build.sh"), "--tag", tag]
    if base := engine.base_image():
        argv += ["--base", base]
    if engine.name == "podman":
        # No intermediate images (the builder stage disappears with the build) and no build
        # containers left by a failed step, so removing the tag below leaves nothing behind.
        argv += ["--", "--layers=false", "--force-rm"]
    env = {**os.environ, "AUTHZ_IMAGE_ENGINE": engine.name}
    if not (env.get("AUTHZ_PIP_CA") or env.get("PIP_CERT")) and Path(SYSTEM_CA).is_file():
        # Where TLS to PyPI is intercepted (as here), pip in the builder stage needs the
        # host's CA bundle; on an ordinary host the system bundle verifies PyPI just as well.
        env["AUTHZ_PIP_CA"] = SYSTEM_CA
    started = time.monotonic()
    try:
        must(argv, timeout=BUILD_TIMEOUT, env=env)
        print(f"built {tag} with {engine.name} in {time.monotonic() - started:.0f}s")
        yield tag
    finally:
        engine.remove_image(tag)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A directory the image's non-root user can read (pytest's tmp dirs are 0700)."""
    d = tmp_path / "etc-authz"
    d.mkdir()
    # Only the mounted directory's own mode matters: inside the container it is reached
    # through the mount, not through the host's parent directories.
    d.chmod(0o755)
    return d


@pytest.fixture
def container(engine: Engine, image: str, config_dir: Path) -> Iterator[Container]:
    c = engine.container(image, config_dir)
    try:
        yield c
    finally:
        c.remove()
