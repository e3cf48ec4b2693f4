"""A gateway on a Postgres metadata database (a real Postgres 15) across a restart and an
outage: its shared instance comes back, a lost database answers 57P03 and the gateway
recovers, and `sqlrs serve` refuses to start without its database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from taidon_proxy.store.audit import AuditFilter
from tests.conftest import ProxyFactory, free_port
from tests.metadata_pg_server import (
    MetadataServer,
    gateway,
    metadata_dsn,
    metadata_server,
    one,
)

pytestmark = pytest.mark.integration
__all__ = ["metadata_dsn", "metadata_server"]  # fixtures


def test_serve_exits_with_the_reason_and_no_password(pg_dir: Path) -> None:
    port = free_port()
    cfg = pg_dir / "taidon.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{free_port()}\nadmin: {{listen: null}}\nstore: {pg_dir / 's'}\n"
        "metadata: {kind: postgres, dsn: '${TAIDON_METADATA_DSN}'}\n"
    )
    env = {**os.environ, "TAIDON_METADATA_DSN": f"postgresql://u:s3cret-pw@127.0.0.1:{port}/m"}
    sqlrs = Path(sys.executable).parent / "sqlrs"
    done = subprocess.run(
        [str(sqlrs), "--config", str(cfg), "serve"], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 3, out  # EXIT_CONFIG
    assert f"cannot reach the Postgres metadata database u@127.0.0.1:{port}/m" in out
    assert "s3cret-pw" not in out


async def test_a_restart_keeps_the_shared_instance(
    make_proxy: ProxyFactory, pg_dir: Path, metadata_dsn: str
) -> None:
    a = await gateway(make_proxy, pg_dir, metadata_dsn, "gw-a")
    conn = await asyncpg.connect(a.dsn("shop:kept"), timeout=120)
    await conn.execute("insert into items values (40)")
    await conn.close()
    before = await a.proxy.meta.shared_instances()
    await a.proxy.close()
    again = await gateway(make_proxy, pg_dir, metadata_dsn, "gw-a")
    after = await again.proxy.meta.shared_instances()
    assert [(r.key, r.clone_id, r.status) for r in after] == [
        (before[0].key, before[0].clone_id, "stopped")
    ]
    assert await one(again, "shop:kept", "select sum(x) from items") == 43


# --- an outage ------------------------------------------------------------------------------


async def test_lost_database_answers_57P03_and_recovers(
    make_proxy: ProxyFactory, pg_dir: Path, metadata_dsn: str, metadata_server: MetadataServer
) -> None:
    a = await gateway(make_proxy, pg_dir, metadata_dsn, "gw-a")
    assert await one(a, "shop:before", "select count(*) from items") == 2
    metadata_server.stop()
    try:
        with pytest.raises(asyncpg.CannotConnectNowError) as e:
            await one(a, "shop:during", "select 1")
        assert e.value.sqlstate == "57P03"
        assert "metadata database is not reachable" in str(e.value)
        a.proxy.audit.record("drain", actor="admin", during="outage")
        await a.proxy.audit_log.flush()  # cannot be written now: kept for later
    finally:
        metadata_server.start()
    assert await one(a, "shop:after", "select count(*) from items") == 2
    await a.proxy.audit_log.flush()
    records = await a.proxy.audit_log.query(AuditFilter(kind="drain"))
    assert [r.fields["during"] for r in records] == ["outage"]
    assert (await a.proxy.audit.verify()).ok
