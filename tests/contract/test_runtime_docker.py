"""The runtime contract against DockerRuntime, plus what only the docker runtime promises."""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taidon_proxy.runtimes import open_runtime
from taidon_proxy.runtimes.base import InstanceHandle, InstanceRuntime, RuntimeError_
from taidon_proxy.runtimes.docker import DockerRuntime
from taidon_proxy.runtimes.docker_daemon import LABEL_INSTANCE, LABEL_ROLE, LABEL_STORE
from taidon_proxy.store.ids import initdb_state_id
from tests.contract.runtime_suite import (
    Harness,
    RuntimeContract,
    RuntimeFactory,
    make_shared_tmp,
    query,
)
from tests.docker_support import (
    REPO,
    api,
    cli,
    container_log,
    containers_of,
    derived_image,
    docker_image,
    store_label,
)

__all__ = ["docker_image", "store_label"]  # fixtures, imported to be found

DOCKER_MARKS = [pytest.mark.docker, pytest.mark.root]


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = make_shared_tmp("taidon-r-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def image_without_postgres(docker_image: str) -> Iterator[str]:
    tag = derived_image(
        docker_image,
        "taidon-test/no-postgres:1",
        run=["rm", "-rf", "/usr/lib/postgresql"],
        change="LABEL org.taidon.test=no-postgres",
    )
    yield tag
    cli("rmi", "-f", tag)


def inspect(handle: InstanceHandle) -> dict:
    client = api()
    try:
        return client.inspect_container(handle.extra["container_id"])
    finally:
        client.close()


class TestDockerRuntime(RuntimeContract):
    kind = "docker"
    pytestmark = [*RuntimeContract.pytestmark, *DOCKER_MARKS]  # noqa: RUF012 - pytest reads it

    @pytest.fixture
    def runtime_factory(self, docker_image: str, run_dir: Path, store_label: str) -> RuntimeFactory:
        return lambda: DockerRuntime(image=docker_image, run_dir=run_dir, store_label=store_label)

    def server_log(self, handle: InstanceHandle) -> str:
        return container_log(handle.extra["container_id"])

    # -- the image decides the engine ---------------------------------------------------------

    async def test_engine_and_user_come_from_the_image(self, docker_image: str) -> None:
        rt = DockerRuntime(image=docker_image, run_dir=Path("/nonexistent"), store_label="x")
        try:
            info = await rt.engine()
            facts = await rt.image_facts()
        finally:
            await rt.close()
        reported = cli("run", "--rm", "--network", "none", docker_image, "postgres", "--version")
        assert f"(PostgreSQL) {info.version} " in reported
        image_id = cli("image", "inspect", "-f", "{{.Id}}", docker_image).strip()
        assert info.source == f"docker:{docker_image}@{image_id}"
        ids = cli("run", "--rm", "--network", "none", docker_image, "id", "postgres")
        assert f"uid={facts.uid}(postgres) gid={facts.gid}(" in ids

    async def test_two_images_never_share_states(self, docker_image: str) -> None:
        other = derived_image(
            docker_image, "taidon-test/same-postgres:1", run=None, change="LABEL x=y"
        )
        try:
            a = DockerRuntime(image=docker_image, run_dir=Path("/nonexistent"), store_label="x")
            b = DockerRuntime(image=other, run_dir=Path("/nonexistent"), store_label="x")
            ea, eb = await a.engine(), await b.engine()
            await a.close()
            await b.close()
        finally:
            cli("rmi", "-f", other)
        assert ea.version == eb.version
        assert ea.source != eb.source
        assert initdb_state_id(ea.version, ea.source, {}) != initdb_state_id(
            eb.version, eb.source, {}
        )

    # -- isolation ----------------------------------------------------------------------------

    async def test_container_has_no_network_and_carries_labels(
        self, runtime: InstanceRuntime, harness: Harness, store_label: str
    ) -> None:
        assert isinstance(runtime, DockerRuntime)
        facts = await runtime.image_facts()
        pgdata = await harness.pgdata(runtime)
        handle = await harness.start(runtime, "net", pgdata)
        info = inspect(handle)
        assert info["HostConfig"]["NetworkMode"] == "none"
        assert info["Config"]["Labels"][LABEL_STORE] == store_label
        assert info["Config"]["Labels"][LABEL_INSTANCE] == "net"
        assert info["Config"]["Labels"][LABEL_ROLE] == "instance"
        assert info["Config"]["User"] == f"{facts.uid}:{facts.gid}"
        assert info["State"]["Pid"] == handle.pid
        devices = cli("exec", info["Id"], "cat", "/proc/net/dev").splitlines()[2:]
        assert [line.split(":")[0].strip() for line in devices] == ["lo"]
        assert pgdata.stat().st_uid == facts.uid
        assert handle.socket_dir.stat().st_uid == facts.uid
        assert stat.S_IMODE(handle.socket_dir.stat().st_mode) == 0o700
        assert await query(handle, "select current_setting('data_directory')") == (
            "/var/lib/postgresql/data"
        )

    async def test_memory_and_cpu_limits(
        self, docker_image: str, run_dir: Path, store_label: str, harness: Harness
    ) -> None:
        rt = DockerRuntime(
            image=docker_image,
            run_dir=run_dir,
            store_label=store_label,
            memory="256m",
            cpus=0.5,
        )
        harness.runtimes.append(rt)
        handle = await harness.start(rt, "limited", await harness.pgdata(rt))
        host_config = inspect(handle)["HostConfig"]
        assert host_config["Memory"] == 256 * 1024 * 1024
        assert host_config["NanoCpus"] == 500_000_000
        assert await query(handle, "select 1") == 1

    async def test_root_owned_clone_is_handed_to_the_image_user(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        assert isinstance(runtime, DockerRuntime)
        template = await harness.pgdata(runtime, "orig")
        copy = harness.workdir / "copy"
        await asyncio.to_thread(shutil.copytree, template, copy)  # owned by root now
        handle = await harness.start(runtime, "owned", copy)
        assert await query(handle, "select 1") == 1
        assert copy.stat().st_uid == (await runtime.image_facts()).uid

    async def test_reap_leaves_other_stores_alone(
        self, docker_image: str, run_dir: Path, harness: Harness
    ) -> None:
        from tests.docker_support import new_store_label, remove_test_containers

        other_label = new_store_label()
        other = DockerRuntime(image=docker_image, run_dir=run_dir, store_label=other_label)
        harness.runtimes.append(other)
        try:
            theirs = await harness.start(other, "theirs", await harness.pgdata(other))
            mine = harness.new_runtime()
            assert await mine.reap(set()) == []
            assert await query(theirs, "select 1") == 1
        finally:
            await other.close()
            remove_test_containers(other_label)

    # -- bad input: a clear error, nothing left behind ---------------------------------------

    async def test_failed_start_leaves_nothing(
        self, runtime: InstanceRuntime, harness: Harness, run_dir: Path, store_label: str
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        (pgdata / "postgresql.conf").write_text("shared_buffers = 'lots'\n")
        with pytest.raises(RuntimeError_) as info:
            await harness.start(runtime, "bad", pgdata)
        assert "exited during start" in str(info.value)
        assert 'invalid value for parameter "shared_buffers"' in str(info.value)
        assert containers_of(store_label) == []
        assert list(run_dir.iterdir()) == []

    async def test_memory_limit_death_is_named(
        self, docker_image: str, run_dir: Path, store_label: str, harness: Harness
    ) -> None:
        rt = DockerRuntime(
            image=docker_image, run_dir=run_dir, store_label=store_label, memory="6m"
        )
        harness.runtimes.append(rt)
        pgdata = await harness.pgdata(rt)
        with pytest.raises(RuntimeError_, match=r"killed at the memory limit \(6m\)"):
            await harness.start(rt, "small", pgdata, {"shared_buffers": "128MB"})
        assert containers_of(store_label) == []
        assert list(run_dir.iterdir()) == []

    async def test_missing_image_is_named(self, run_dir: Path, store_label: str) -> None:
        rt = DockerRuntime(image="taidon-test/absent:0", run_dir=run_dir, store_label=store_label)
        try:
            with pytest.raises(RuntimeError_, match=r"image taidon-test/absent:0 not found"):
                await rt.engine()
        finally:
            await rt.close()

    async def test_image_without_postgres_is_named(
        self, image_without_postgres: str, run_dir: Path, store_label: str
    ) -> None:
        rt = DockerRuntime(image=image_without_postgres, run_dir=run_dir, store_label=store_label)
        try:
            with pytest.raises(RuntimeError_, match="has no usable Postgres"):
                await rt.init_cluster(run_dir / "pg", {})
        finally:
            await rt.close()
        assert not (run_dir / "pg").exists()
        assert containers_of(store_label) == []

    async def test_data_dir_of_another_major_is_refused(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        (pgdata / "PG_VERSION").write_text("14\n")
        with pytest.raises(RuntimeError_, match=r"Postgres 14 cluster.* runs 15"):
            await harness.start(runtime, "old", pgdata)

    async def test_unwritable_socket_dir_is_named(
        self, docker_image: str, store_label: str, harness: Harness
    ) -> None:
        mount = make_shared_tmp("taidon-ro-")
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True
        )
        try:
            rt = DockerRuntime(image=docker_image, run_dir=mount, store_label=store_label)
            harness.runtimes.append(rt)
            pgdata = await harness.pgdata(rt)
            with pytest.raises(RuntimeError_, match=r"socket directory.*Read-only file system"):
                await harness.start(rt, "ro", pgdata)
            assert containers_of(store_label) == []
        finally:
            subprocess.run(["umount", str(mount)], check=True)
            mount.rmdir()

    async def test_socket_path_limit_is_checked(
        self, docker_image: str, store_label: str, harness: Harness
    ) -> None:
        rt = DockerRuntime(
            image=docker_image, run_dir=harness.workdir / ("d" * 90), store_label=store_label
        )
        harness.runtimes.append(rt)
        with pytest.raises(RuntimeError_, match="107 bytes"):
            await harness.start(rt, "deep", await harness.pgdata(rt))


@pytest.mark.contract
async def test_daemon_not_running_is_named(tmp_path: Path) -> None:
    rt = DockerRuntime(
        image="taidon/postgres:15",
        run_dir=tmp_path,
        store_label="x",
        docker_host=f"unix://{tmp_path}/docker.sock",
    )
    with pytest.raises(RuntimeError_, match="daemon is not running"):
        await rt.engine()


@pytest.mark.contract
async def test_docker_not_installed_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no dockerd to be found
    rt = DockerRuntime(
        image="taidon/postgres:15",
        run_dir=tmp_path,
        store_label="x",
        docker_host=f"unix://{tmp_path}/docker.sock",
    )
    with pytest.raises(RuntimeError_, match="Docker is not installed"):
        await rt.engine()


@pytest.mark.unit
def test_registry_opens_docker(tmp_path: Path) -> None:
    rt = open_runtime("docker", image="img", run_dir=tmp_path, store_label="s", cpus=1.5)
    assert isinstance(rt, DockerRuntime)
    assert isinstance(rt, InstanceRuntime)
    assert rt.capabilities.name == "docker" and rt.capabilities.can_freeze
    with pytest.raises(RuntimeError_, match="cpus"):
        DockerRuntime(image="img", run_dir=tmp_path, store_label="s", cpus=0)


@pytest.mark.docker
@pytest.mark.root
def test_image_script_is_idempotent_and_fast_when_built(docker_image: str) -> None:
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(REPO / "scripts" / "docker-image"), docker_image],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # nothing was built
    assert time.perf_counter() - t0 < 5
