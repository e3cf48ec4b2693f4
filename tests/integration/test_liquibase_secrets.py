"""Liquibase parameters marked secret: masked in what clients, events and the API show, yet
part of the state id."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import asyncpg
import pytest

from taidon_proxy.admin.auth import read_token
from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import BuildFailed, ConfigError
from taidon_proxy.prepare.liquibase.launcher import find_launcher
from tests import log_secrets
from tests.conftest import ProxyFactory


def _launcher() -> bool:
    try:
        find_launcher(parse_config("{}", source=Path(__file__)))
    except BuildFailed:
        return False
    return True


pytestmark = [
    pytest.mark.integration,
    pytest.mark.liquibase,
    pytest.mark.skipif(not _launcher(), reason="Liquibase is not installed"),
]
SECRET = "Sekr1t-param-7788"
log_secrets.register(SECRET)
CHANGELOG = """--liquibase formatted sql
--changeset taidon:1
create table owner (pw text);
--changeset taidon:2
select '${pw}'::int;
"""


def recipe(project: Path, value: str) -> dict[str, object]:
    return {
        "prepare": {
            "kind": "lb", "search_path": [str(project)], "changelog": "changelog.sql",
            "parameters": {"pw": value, "plain": "shown"}, "secret_parameters": ["pw"],
        }
    }  # fmt: skip


async def test_a_secret_parameter_is_masked_everywhere_a_client_looks(
    make_proxy: ProxyFactory, pg_dir: Path
) -> None:
    project = pg_dir / "lb"
    project.mkdir()
    (project / "changelog.sql").write_text(CHANGELOG)
    p = await make_proxy({"a": recipe(project, SECRET)}, admin={"listen": "127.0.0.1:0"})
    with pytest.raises(asyncpg.PostgresError) as failed:  # '...'::int fails in changeset 2
        await asyncpg.connect(p.dsn("a"), timeout=180)
    text = f"{failed.value} {getattr(failed.value, 'detail', '')}"
    assert "invalid input syntax for type integer" in text, text
    assert SECRET not in text and "(secret)" in text
    assert p.proxy.builder is not None
    events = [e.message for j in p.proxy.builder.jobs.values() for e in j.events]
    assert any("(secret)" in m for m in events) and not any(SECRET in m for m in events)
    assert p.proxy.admin is not None
    headers = {"Authorization": f"Bearer {read_token(p.proxy.config.store)}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"http://{p.proxy.admin.address}/v1/config") as r,
    ):
        body = await r.text()
    assert SECRET not in body and '"pw": "(secret)"' in body and '"plain": "shown"' in body
    # The value still makes the state: another value plans another id for changeset 2.
    first = await p.proxy.builder.plan("a")
    p.config_path.write_text(p.config_path.read_text().replace(SECRET, "other-value-1234"))
    await p.proxy.reload()
    second = await p.proxy.builder.plan("a")
    assert [s.state_id for s in first] != [s.state_id for s in second]


def test_secret_parameters_must_name_parameters(pg_dir: Path) -> None:
    text = (
        "databases:\n  a:\n    prepare: {kind: lb, changelog: c.xml, parameters: {x: '1'},"
        " secret_parameters: [y]}\n"
    )
    with pytest.raises(ConfigError, match="secret_parameters names no parameter: y"):
        parse_config(text, source=pg_dir / "taidon.yaml", check=False)
