"""Test support for the docker runtime: a running daemon, the local image, labelled cleanup."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, NotFound

from taidon_proxy.runtimes.docker_daemon import DEFAULT_HOST, LABEL_STORE

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("TAIDON_TEST_DOCKER_IMAGE", "taidon/postgres:15")
# Every store label a test uses starts with this, so the session can remove what tests left.
LABEL_PREFIX = "taidon-test-"
# The Debian CLI speaks the Debian daemon's API version.
DOCKER_CLI = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


def _script(name: str, timeout: float) -> str:
    try:
        done = subprocess.run(
            [str(REPO / "scripts" / name)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/{name} did not finish within {timeout:.0f} s: {exc.output!r}")
    if done.returncode != 0:
        pytest.fail(f"scripts/{name} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def api() -> Any:
    """A blocking low-level client, for tests only."""
    return docker.APIClient(base_url=DEFAULT_HOST, version="auto", timeout=30)


def cli(*args: str, timeout: float = 120) -> str:
    """Run the docker CLI; return stdout; fail the test with stderr on error."""
    done = subprocess.run(
        [DOCKER_CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
    return done.stdout


def new_store_label() -> str:
    return f"{LABEL_PREFIX}{uuid.uuid4().hex[:10]}"


def containers_of(label: str) -> list[dict[str, Any]]:
    client = api()
    try:
        return list(client.containers(all=True, filters={"label": f"{LABEL_STORE}={label}"}))
    finally:
        client.close()


def remove_test_containers(only_label: str | None = None) -> list[str]:
    """Remove containers of test stores (all, or one label); return their names."""
    client = api()
    removed: list[str] = []
    try:
        for c in client.containers(all=True, filters={"label": LABEL_STORE}):
            label = (c.get("Labels") or {}).get(LABEL_STORE, "")
            if label.startswith(LABEL_PREFIX) and only_label in (None, label):
                try:
                    client.remove_container(c["Id"], force=True, v=True)
                except NotFound:
                    continue
                removed.extend(c.get("Names") or [c["Id"][:12]])
    finally:
        client.close()
    return removed


def container_log(container_id: str) -> str:
    client = api()
    try:
        raw = client.logs(container_id)
    except NotFound:
        return ""
    except DockerException as exc:
        return f"(no log: {exc})"
    finally:
        client.close()
    return str(raw.decode(errors="replace"))


def ensure_docker() -> tuple[str, int | None]:
    """Start dockerd and build the image when needed (as CI must).

    Returns the image name and the pid of the dockerd this call started (None if it ran already).
    """
    if os.geteuid() != 0:
        pytest.skip("docker tests need root: they start dockerd and build the Postgres image")
    started = re.search(r"started dockerd pid (\d+)", _script("dockerd-up", timeout=90))
    _script("docker-image", timeout=900)
    return IMAGE, int(started.group(1)) if started else None


def stop_dockerd(pid: int) -> None:
    """Stop the dockerd we started (SIGTERM: it stops its containerd too), bounded."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def docker_image() -> Iterator[str]:
    """The local Postgres image, with a running daemon.

    At the end: removes test containers, and stops dockerd if this session started it
    (TAIDON_KEEP_DOCKERD=1 keeps it running for the next session).
    """
    image, dockerd_pid = ensure_docker()
    yield image
    left = remove_test_containers()
    if left:
        print(f"removed containers left by docker tests: {left}")
    if dockerd_pid is not None and not os.environ.get("TAIDON_KEEP_DOCKERD"):
        stop_dockerd(dockerd_pid)


@pytest.fixture
def store_label(docker_image: str) -> Iterator[str]:
    """A fresh store label; after the test, none of its containers may remain."""
    label = new_store_label()
    yield label
    left = remove_test_containers(label)
    assert not left, f"containers left behind by the test: {left}"


def derived_image(base: str, tag: str, *, run: list[str] | None, change: str) -> str:
    """An image made from `base` by running `run` in it and committing with `change`."""
    name = f"taidon-test-build-{uuid.uuid4().hex[:8]}"
    cli("run", "--name", name, "--network", "none", base, *(run or ["true"]))
    try:
        cli("commit", "-c", change, name, tag)
    finally:
        cli("rm", "-f", name)
    return tag
