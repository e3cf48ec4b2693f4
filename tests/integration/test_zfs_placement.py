"""The zfs backend on a dataset that is not mounted at <store>/data: a real zfs-fuse pool."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from taidon_proxy.app import Proxy
from taidon_proxy.config import Config
from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError
from tests.conftest import ProxyFactory, demo_recipe
from tests.contract.snapshot_fixtures import ZfsPool, retry_busy, sh, zfs_pool

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture(scope="module")
def pool() -> Iterator[ZfsPool]:
    if os.geteuid() != 0:
        pytest.skip("needs root: zfs-fuse pool")
    with zfs_pool() as p:
        yield p


@pytest.fixture
def dataset(pool: ZfsPool) -> Iterator[tuple[str, Path]]:
    """A dataset mounted at its own directory (as `zfs create` leaves it), torn down after."""
    name = f"{pool.name}/taidon{secrets.token_hex(2)}"
    mountpoint = pool.mountpoint / name.rsplit("/", 1)[1]
    sh("zfs", "create", "-o", f"mountpoint={mountpoint}", name)
    mountpoint.chmod(0o755)
    try:
        yield name, mountpoint
    finally:
        retry_busy("zfs", "destroy", "-r", "-f", name)


def mountpoint_of(dataset: str) -> str:
    return sh("zfs", "get", "-H", "-o", "value", "mountpoint", dataset).strip()


async def count_films(host: str, port: int, database: str = "demo") -> int:
    dsn = f"postgresql://postgres@{host}:{port}/{database}"
    conn = await asyncpg.connect(dsn, timeout=180)
    try:
        return int(await conn.fetchval("select count(*) from film"))
    finally:
        await conn.close()


async def started(config: Config) -> tuple[Proxy, str, int]:
    proxy = await Proxy.open(config)
    try:
        await proxy.start()
    except BaseException:
        await proxy.close()
        raise
    assert proxy.server is not None
    host, port = proxy.server.addresses[0].rsplit(":", 1)
    return proxy, host, int(port)


async def test_store_on_the_dataset(dataset: tuple[str, Path], pg_dir: Path) -> None:
    """`snapshot: {backend: zfs, dataset: D}` with the store at D's mountpoint: states go in
    the child D/data, which mounts at <store>/data by inheritance; D keeps its mountpoint."""
    name, mountpoint = dataset
    path = pg_dir / "taidon.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": None},
                "store": str(mountpoint),
                "snapshot": {"backend": "zfs", "dataset": name},
                "runtime": {"kind": "process", "run_dir": str(pg_dir / "run")},
                "databases": {"demo": demo_recipe()},
            }
        )
    )
    config = load_config(path)
    store_data = mountpoint / "data"
    proxy, host, port = await started(config)
    try:
        assert mountpoint_of(name) == str(mountpoint)  # the user's dataset was not moved
        assert mountpoint_of(f"{name}/data") == str(store_data)
        assert proxy.backend_name == "zfs"
        assert f"states live in a child dataset made now: {name}/data" in proxy.backend_reason
        assert f"mounted at {store_data}" in proxy.backend_reason
        assert await count_films(host, port) == 1000
        clones = sh("zfs", "list", "-H", "-o", "name", "-r", f"{name}/data/clones").split()
        assert len(clones) >= 2  # the instance's clone is a zfs clone under the child
    finally:
        await proxy.close()

    # A restart finds the child again (and says so) and serves the same state.
    proxy, host, port = await started(config)
    try:
        assert f"its child dataset {name}/data" in proxy.backend_reason, proxy.backend_reason
        assert await count_films(host, port) == 1000
    finally:
        await proxy.close()


async def test_store_elsewhere_with_auto(
    dataset: tuple[str, Path], make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    """`backend: auto` with a dataset named and the store on another filesystem: zfs, its
    child mounted at <store>/data."""
    name, _ = dataset
    store = pg_dir / "elsewhere"
    p = await make_proxy(
        {"demo": demo_recipe()}, store=str(store), snapshot={"backend": "auto", "dataset": name}
    )
    assert p.proxy.backend_name == "zfs", p.proxy.backend_reason
    assert mountpoint_of(f"{name}/data") == str(store / "data")
    assert "is named" in p.proxy.backend_reason and "child dataset" in p.proxy.backend_reason
    assert await count_films(p.host, p.port) == 1000


async def test_a_non_empty_root_is_refused(
    dataset: tuple[str, Path], make_proxy: ProxyFactory
) -> None:
    name, mountpoint = dataset
    (mountpoint / "data").mkdir()
    (mountpoint / "data" / "leftover").write_text("x")
    with pytest.raises(ConfigError, match="is not empty, so a child dataset cannot be mounted"):
        await make_proxy(
            {"demo": demo_recipe()},
            store=str(mountpoint),
            snapshot={"backend": "zfs", "dataset": name},
        )
