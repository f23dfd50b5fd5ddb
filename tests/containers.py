"""Podman for the container tests: every flag this sandbox needs lives here, so that the Dockerfile and
compose.yaml stay the standard files a user runs.

What this sandbox needs, measured (a machine with a working Docker or Podman set-up needs none of it, and the
settings are harmless there):
- explicit ulimits (podman's default nofile/nproc are above the hard limits here, so runc refuses them) and runc
  as the OCI runtime (crun fails on this hybrid cgroup layout): both in a containers.conf of our own, named by
  ``$CONTAINERS_CONF``, which podman and podman-compose read for every container and build step;
- a base image: no container registry is reachable, so ``python:3.11-slim`` cannot be pulled. The image is built
  on ``$CIFAR_PL_TEST_BASE_IMAGE`` if set (e.g. ``python:3.11-slim`` where a registry is reachable), else on a
  Debian bookworm root made by debootstrap from Debian's packages, carrying the host's CA bundle and an
  ``/etc/pip.conf`` naming it (pip inside the build trusts the package index's certificate only then);
- ``--network host`` for the build's ``pip install``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import REPO

PODMAN = shutil.which("podman")
PODMAN_COMPOSE = shutil.which("podman-compose")
DEBOOTSTRAP = shutil.which("debootstrap")
IMAGE = os.environ.get("CIFAR_PL_TEST_IMAGE", "localhost/cifar-pl:test")
DEBIAN_BASE = "localhost/cifar-pl-test-base:bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def missing_tools() -> str | None:
    """Why the container tests cannot run here, or None."""
    if PODMAN is None:
        return "podman is not installed (apt-get install podman runc podman-compose debootstrap)"
    if PODMAN_COMPOSE is None:
        return "podman-compose is not installed (apt-get install podman-compose)"
    if os.environ.get("CIFAR_PL_TEST_BASE_IMAGE") is None and DEBOOTSTRAP is None and not _image_exists(DEBIAN_BASE):
        return (
            "no base image: set CIFAR_PL_TEST_BASE_IMAGE (e.g. python:3.11-slim) or install debootstrap to make one "
            "from Debian's packages"
        )
    return None


def sandbox_env(folder: Path) -> dict[str, str]:
    """The environment for podman and podman-compose: a containers.conf with this sandbox's settings."""
    conf = folder / "containers.conf"
    lines = ["[containers]", 'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]']
    if shutil.which("runc"):
        lines += ["[engine]", 'runtime = "runc"']
    conf.write_text("\n".join(lines) + "\n")
    return dict(os.environ, CONTAINERS_CONF=str(conf))


def podman(
    env: dict[str, str], *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PODMAN or "podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _image_exists(name: str, env: dict[str, str] | None = None) -> bool:
    if PODMAN is None:
        return False
    return subprocess.run([PODMAN, "image", "exists", name], env=env, check=False).returncode == 0


def debian_base_image(env: dict[str, str]) -> str:
    """A Python 3.11 base image made from Debian's packages (kept in podman's storage for later runs)."""
    if _image_exists(DEBIAN_BASE, env):
        return DEBIAN_BASE
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="cifar-pl-rootfs-") as tmp:
        root = Path(tmp) / "root"
        subprocess.run(
            [
                DEBOOTSTRAP or "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                "bookworm",
                str(root),
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
        if HOST_CA_BUNDLE.is_file():
            shutil.copy(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
            (root / "etc/pip.conf").write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [PODMAN or "podman", "import", "-", DEBIAN_BASE], stdin=tar.stdout, env=env, check=True, capture_output=True
        )
        tar.wait(timeout=60)
    return DEBIAN_BASE


def build_image(env: dict[str, str]) -> dict[str, float | str]:
    """Build the project's image from the standard Dockerfile (the dependency layer is cached by podman, so a
    rebuild after a code change takes seconds). Returns what it took, for the report."""
    started = time.monotonic()
    base = os.environ.get("CIFAR_PL_TEST_BASE_IMAGE") or debian_base_image(env)
    based = time.monotonic()
    result = podman(
        env, "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE, str(REPO), timeout=3600
    )
    built = time.monotonic()
    size = podman(env, "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
    return {
        "base": base,
        "base_seconds": round(based - started, 1),
        "build_seconds": round(built - based, 1),
        "size_bytes": size,
        "log_tail": result.stdout[-2000:],
    }


def compose(env: dict[str, str], project: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """podman-compose on the repository's compose.yaml, as project ``project``."""
    result = subprocess.run(
        [PODMAN_COMPOSE or "podman-compose", "-p", project, "-f", str(REPO / "compose.yaml"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"podman-compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def inspect(env: dict[str, str], container: str) -> dict:
    return json.loads(podman(env, "container", "inspect", container).stdout)[0]


def wait_exit(env: dict[str, str], container: str, timeout: float) -> int:
    """The container's exit status, once it has stopped (``podman wait`` with a bound)."""
    result = podman(env, "wait", container, timeout=timeout)
    return int(result.stdout.strip().splitlines()[-1])


def logs(env: dict[str, str], container: str) -> str:
    result = podman(env, "logs", container, check=False)
    return result.stdout + result.stderr


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something true, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout:g} s for {what}")


def world_writable(*folders: Path) -> None:
    """Host folders a container's non-root user writes into (rootful podman maps no user namespace)."""
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)


def names(containers: Sequence[dict]) -> list[str]:
    return [c["Name"] for c in containers]
