"""The instance pod's containers, run for real with Docker from the same pod spec.

No kubelet runs here, so this test plays the kubelet's part for the pod manifest that
`taidon_proxy.k8s.podspec` builds: it resolves the env (values and secretKeyRefs from the
Secret manifest), mounts each volume (the claim as a host directory holding a cluster copied
from a live server, the Secret's files, the emptyDirs), applies the security context (user,
read-only root, no capabilities), runs the init container to completion and then the server,
and polls the readiness probe's own command. Then it connects as the gateway would, with the
generated password, and checks that a wrong one is refused.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from taidon_proxy.k8s import podspec
from taidon_proxy.runtimes.docker import DockerRuntime
from taidon_proxy.runtimes.docker_daemon import LABEL_STORE
from tests.contract.runtime_suite import make_shared_tmp
from tests.docker_support import DOCKER_CLI, cli, docker_image, store_label

__all__ = ["docker_image", "store_label"]  # fixtures, imported to be found

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.root]


@pytest.fixture
def pod_dir() -> Iterator[Path]:
    path = make_shared_tmp("taidon-k8s-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(container: dict[str, Any], secret: dict[str, Any]) -> list[str]:
    out = []
    for item in container.get("env", []):
        if "value" in item:
            out.append(f"{item['name']}={item['value']}")
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        out.append(f"{item['name']}={base64.b64decode(secret['data'][ref['key']]).decode()}")
    return out


class DockerKubelet:
    """Runs a pod manifest's containers with the Docker CLI (a test's stand-in for a kubelet)."""

    def __init__(self, pod: dict[str, Any], secret: dict[str, Any], root: Path, label: str):
        self.pod, self.secret, self.root, self.label = pod, secret, root, label
        self.names: list[str] = []
        sec = pod["spec"]["securityContext"]
        self.uid, self.gid = sec["runAsUser"], sec["runAsGroup"]
        self.volumes: dict[str, Path] = {}
        for volume in pod["spec"]["volumes"]:
            path = root / volume["name"]
            path.mkdir(exist_ok=True)
            if "secret" in volume:
                assert volume["secret"]["secretName"] == secret["metadata"]["name"]
                for key, value in secret["data"].items():
                    (path / key).write_bytes(base64.b64decode(value))
                    os.chown(path / key, 0, sec["fsGroup"])  # as fsGroup makes it
                    (path / key).chmod(volume["secret"]["defaultMode"])
            elif "emptyDir" in volume:
                os.chown(path, self.uid, self.gid)
                path.chmod(0o700)
            self.volumes[volume["name"]] = path

    def _argv(self, container: dict[str, Any], name: str, *, detach: bool) -> list[str]:
        security = container["securityContext"]
        argv = [DOCKER_CLI, "run", "--name", name, "--network", "none"]
        argv += ["--label", f"{LABEL_STORE}={self.label}", "--user", f"{self.uid}:{self.gid}"]
        argv += ["-d"] if detach else []
        if security["readOnlyRootFilesystem"]:
            argv.append("--read-only")
        for cap in security["capabilities"]["drop"]:
            argv += ["--cap-drop", cap]
        if not security["allowPrivilegeEscalation"]:
            argv += ["--security-opt", "no-new-privileges"]
        for env in _env(container, self.secret):
            argv += ["-e", env]
        for mount in container["volumeMounts"]:
            mode = "ro" if mount.get("readOnly") else "rw"
            argv += ["-v", f"{self.volumes[mount['name']]}:{mount['mountPath']}:{mode}"]
        command = container["command"] + container.get("args", [])
        return [*argv, "--entrypoint", command[0], container["image"], *command[1:]]

    def run_init(self) -> None:
        for container in self.pod["spec"]["initContainers"]:
            name = f"{self.label}-{container['name']}"
            self.names.append(name)
            done = subprocess.run(
                self._argv(container, name, detach=False),
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"init container {name}: {done.stdout}{done.stderr}"

    def start(self) -> str:
        (container,) = self.pod["spec"]["containers"]
        name = f"{self.label}-{container['name']}"
        self.names.append(name)
        cli(*self._argv(container, name, detach=True)[1:])
        return name

    def wait_ready(self, name: str, timeout: float = 60) -> float:
        (container,) = self.pod["spec"]["containers"]
        probe = container["readinessProbe"]["exec"]["command"]
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            done = subprocess.run(
                [DOCKER_CLI, "exec", name, *probe], capture_output=True, timeout=30, check=False
            )
            if done.returncode == 0:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"readiness never passed; log:\n{cli('logs', name)}")

    def remove(self) -> None:
        for name in self.names:
            subprocess.run(
                [DOCKER_CLI, "rm", "-f", name], capture_output=True, timeout=60, check=False
            )


async def test_instance_pod_runs_and_admits_only_the_gateways_password(
    docker_image: str, store_label: str, pod_dir: Path
) -> None:
    runtime = DockerRuntime(image=docker_image, run_dir=pod_dir / "r", store_label=store_label)
    facts = await runtime.image_facts()
    # The claim: a real cluster in a directory, as a clone of the state's snapshot would be:
    # copied while its server ran (frozen), so it carries that server's postmaster.pid and
    # needs crash recovery, as a snapshot of a live build server does.
    source = pod_dir / "source"
    await runtime.init_cluster(source, {})
    handle = await runtime.start("k8s-source", source)
    try:
        conn = await asyncpg.connect(host=str(handle.socket_dir), port=handle.port,
                                     user="postgres", database="postgres", timeout=10)  # fmt: skip
        await conn.execute("create table marker (v text); insert into marker values ('cloned')")
        await conn.execute("checkpoint")  # what a live snapshot does first (synchronous_commit off)
        await conn.close()
        await runtime.freeze(handle)
        claim = pod_dir / "claim"
        claim.mkdir()
        os.chown(claim, facts.uid, facts.gid)
        subprocess.run(["cp", "-a", str(source), str(claim / "pgdata")], check=True, timeout=60)
        await runtime.thaw(handle)
    finally:
        await runtime.close()
    assert (claim / "pgdata" / "postmaster.pid").exists()

    inp = podspec.InstanceInputs(
        name="orders-1",
        namespace="team-a",
        image=podspec.PodImage(docker_image, uid=facts.uid, gid=facts.gid),
        snapshot_name="tds-0123abcd",
        storage_size="1Gi",
    )
    password = secrets.token_urlsafe(18)
    secret = podspec.secret_manifest(inp, podspec.Credentials.make(password, os.urandom(16)))
    pod = podspec.instance_pod_manifest(inp)
    pod["spec"]["volumes"][0] = {"name": "data"}  # the claim is a host directory here
    kubelet = DockerKubelet(pod, secret, pod_dir, store_label)
    shutil.rmtree(kubelet.volumes["data"])
    kubelet.volumes["data"] = claim
    try:
        kubelet.run_init()
        name = kubelet.start()
        kubelet.wait_ready(name)
        socket_dir = str(kubelet.volumes["run"])
        conn = await asyncpg.connect(
            host=socket_dir, port=5432, user="postgres", password=password,
            database="postgres", timeout=10,
        )  # fmt: skip
        try:
            assert await conn.fetchval("select current_setting('listen_addresses')") == "*"
            assert await conn.fetchval("select current_setting('hba_file')") == podspec.HBA_FILE
            method = await conn.fetchval(
                "select auth_method from pg_hba_file_rules where type = 'local'"
            )
            assert method == "scram-sha-256"
            assert await conn.fetchval("select v from marker") == "cloned"
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(
                host=socket_dir, port=5432, user="postgres", password="wrong",
                database="postgres", timeout=10,
            )  # fmt: skip
        with pytest.raises(
            (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
        ):
            await asyncpg.connect(
                host=socket_dir, port=5432, user="postgres", database="postgres", timeout=10
            )
        # Over TCP inside the pod's network namespace (a gateway's path), the same rule holds.
        tcp = [DOCKER_CLI, "exec", "-e", f"PGPASSWORD={password}", name, "psql", "-h",
               "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc", "select 42"]  # fmt: skip
        ok = subprocess.run(tcp, capture_output=True, text=True, timeout=30, check=False)
        assert ok.stdout == "42\n", ok.stderr
        tcp[3] = "PGPASSWORD=wrong"
        refused = subprocess.run(tcp, capture_output=True, text=True, timeout=30, check=False)
        assert refused.returncode != 0
        assert "password authentication failed" in refused.stderr
        # The root filesystem is read-only and the server runs as the image's postgres user.
        ps = cli("exec", name, "sh", "-c", "id -u; touch /x 2>&1 || true")
        assert ps.splitlines()[0] == str(facts.uid)
        assert "Read-only file system" in ps
    finally:
        kubelet.remove()
