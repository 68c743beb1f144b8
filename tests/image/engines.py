"""Container engines for the image suite: build, inspect and run the image with docker or podman.

Two engines, one suite:
- docker, where a daemon answers: the image is built on the Dockerfile's default base and run
  with `docker run --read-only`, ports published on 127.0.0.1;
- podman + buildah otherwise (this sandbox has no Docker daemon and `podman run` cannot set
  up cgroups here): `podman build --isolation=chroot` on a local python base made by
  scripts/image/base-image.sh (cached), and `buildah run --isolation chroot`, which shares the
  host's network namespace, so the server is reached on 127.0.0.1 directly. buildah cannot
  start a container with a read-only root, so the suite compares the container's writable
  layer (`podman diff`) before and after serving instead, and the server runs as the image's
  non-root user, which cannot write outside the /tmp volume anyway.

Environment: AUTHZ_IMAGE_ENGINE=docker|podman forces an engine; AUTHZ_TEST_BASE_IMAGE uses that
base instead of the default (docker) or the locally made one (podman).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "image"
# Inside the container: the test's config directory is mounted here read-only.
CONFIG_MOUNT = "/etc/authz"

# Measured here: base image from cache < 5 s, from scratch ~60 s (debootstrap); the build
# ~40 s, most of it pip downloading ~25 MB of wheels. The bounds leave room for a loaded CI
# machine and a slow mirror while still ending a hung build.
BASE_TIMEOUT = 900.0
BUILD_TIMEOUT = 600.0
CMD_TIMEOUT = 120.0

Done: TypeAlias = "subprocess.CompletedProcess[str]"
Proc: TypeAlias = "subprocess.Popen[bytes]"


def run(argv: Sequence[str], *, timeout: float = CMD_TIMEOUT,
        env: dict[str, str] | None = None) -> Done:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


def must(argv: Sequence[str], **kw: Any) -> str:
    r = run(argv, **kw)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n"
                    f"{r.stderr[-3000:]}", pytrace=False)
    return r.stdout


class Container(Protocol):
    """One container of the image, with the test's config directory mounted read-only."""

    # Address the server must bind inside the container to be reachable from the host.
    bind_host: str

    def oneshot(self, argv: Sequence[str], *, root: bool = False) -> Done:
        """Run a command to completion (as the image's user, or root) and return its result."""

    def serve(self, args: Sequence[str], log: Path, ports: Sequence[int]) -> Proc:
        """Start the image's entrypoint with `args`; output goes to `log`."""

    def stop(self, proc: Proc, timeout: float) -> int:
        """SIGTERM the service, wait up to `timeout` s, return its exit status."""

    def changes(self) -> set[str] | None:
        """Paths changed in the container's writable layer, or None where the root is
        mounted read-only and nothing can change."""

    def remove(self) -> None: ...


class Engine(Protocol):
    name: str

    def base_image(self) -> str | None: ...
    def inspect(self, image: str) -> dict[str, Any]: ...
    def container(self, image: str, config_dir: Path) -> Container: ...
    def remove_image(self, image: str) -> None: ...


# --- podman + buildah ----------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """All processes below `pid`, parents before children (from /proc, no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may contain spaces, so split
        # after its closing parenthesis.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    order: list[int] = []
    queue = [pid]
    while queue:
        for child in sorted(children.get(queue.pop(0), [])):
            order.append(child)
            queue.append(child)
    return order


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().split("\0")
    except OSError:
        return []


class BuildahContainer:
    bind_host = "127.0.0.1"

    def __init__(self, image: str, config_dir: Path) -> None:
        self.name = f"authz-image-test-{uuid.uuid4().hex[:10]}"
        self.config_dir = config_dir
        self.entrypoint: list[str] = PodmanEngine().inspect(image)["Config"]["Entrypoint"]
        must(["buildah", "from", "--pull-never", "--name", self.name, image])

    def _run_argv(self, argv: Sequence[str], root: bool) -> list[str]:
        user = ["--user", "0:0"] if root else []
        return ["buildah", "run", "--isolation", "chroot", *user,
                "--volume", f"{self.config_dir}:{CONFIG_MOUNT}:ro", self.name, "--", *argv]

    def oneshot(self, argv: Sequence[str], *, root: bool = False) -> Done:
        return run(self._run_argv(argv, root))

    def serve(self, args: Sequence[str], log: Path, ports: Sequence[int]) -> Proc:
        with log.open("wb") as out:
            # Own session: if everything else fails, the whole tree can be killed at once.
            return subprocess.Popen(self._run_argv([*self.entrypoint, *args], False),
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def service_pid(self, proc: Proc) -> int | None:
        """The entrypoint's process: buildah run -> buildah-chroot-runtime ->
        buildah-chroot-exec -> `authz serve` (argv[0] is the venv's python)."""
        for pid in _descendants(proc.pid):
            argv = _cmdline(pid)
            if argv and not Path(argv[0]).name.startswith("buildah") and "serve" in argv:
                return pid
        return None

    def stop(self, proc: Proc, timeout: float) -> int:
        # `buildah run` does not forward SIGTERM (it kills its child outright), so the signal
        # goes to the service itself, the way a kubelet's would.
        pid = self.service_pid(proc)
        if pid is not None and proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise

    def changes(self) -> set[str] | None:
        out = must(["podman", "diff", self.name])
        return {line.strip() for line in out.splitlines() if line.strip()}

    def remove(self) -> None:
        run(["buildah", "rm", self.name])


class PodmanEngine:
    name = "podman"

    def base_image(self) -> str | None:
        if base := os.environ.get("AUTHZ_TEST_BASE_IMAGE"):
            return base
        # Prints the image name last; cached under $AUTHZ_IMAGE_CACHE between runs.
        out = must(["bash", str(SCRIPTS / "base-image.sh")], timeout=BASE_TIMEOUT)
        return out.strip().splitlines()[-1]

    def inspect(self, image: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(must(["podman", "image", "inspect", image]))
        return data[0]

    def container(self, image: str, config_dir: Path) -> Container:
        return BuildahContainer(image, config_dir)

    def remove_image(self, image: str) -> None:
        run(["podman", "rmi", "--force", image])


# --- docker --------------------------------------------------------------------------------

class DockerContainer:
    bind_host = "0.0.0.0"

    def __init__(self, image: str, config_dir: Path) -> None:
        self.image = image
        self.name = f"authz-image-test-{uuid.uuid4().hex[:10]}"
        self.config_dir = config_dir

    def _common(self) -> list[str]:
        # Exactly the production posture: read-only root, scratch only on the /tmp volume.
        return ["--read-only", "--tmpfs", "/tmp",
                "--volume", f"{self.config_dir}:{CONFIG_MOUNT}:ro"]

    def oneshot(self, argv: Sequence[str], *, root: bool = False) -> Done:
        user = ["--user", "0:0"] if root else []
        return run(["docker", "run", "--rm", *self._common(), *user, "--entrypoint", argv[0],
                     self.image, *argv[1:]])

    def serve(self, args: Sequence[str], log: Path, ports: Sequence[int]) -> Proc:
        publish = [f"--publish=127.0.0.1:{p}:{p}" for p in ports]
        with log.open("wb") as out:
            return subprocess.Popen(["docker", "run", "--name", self.name, *self._common(),
                                     *publish, self.image, *args],
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def stop(self, proc: Proc, timeout: float) -> int:
        run(["docker", "stop", "--time", str(int(timeout)), self.name], timeout=timeout + 30)
        proc.wait(timeout=30)
        return int(must(["docker", "inspect", "--format", "{{.State.ExitCode}}",
                          self.name]).strip())

    def changes(self) -> set[str] | None:
        return None  # --read-only: the kernel refuses every write to the root

    def remove(self) -> None:
        run(["docker", "rm", "--force", self.name])


class DockerEngine:
    name = "docker"

    def base_image(self) -> str | None:
        return os.environ.get("AUTHZ_TEST_BASE_IMAGE")  # None: the Dockerfile's default

    def inspect(self, image: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(must(["docker", "image", "inspect", image]))
        return data[0]

    def container(self, image: str, config_dir: Path) -> Container:
        return DockerContainer(image, config_dir)

    def remove_image(self, image: str) -> None:
        run(["docker", "rmi", "--force", image])


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return run(["docker", "info"], timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False
