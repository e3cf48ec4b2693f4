"""Zero-config discovery on real repository layouts: what is found, in which order, and what
a bare `sqlrs serve` / `sqlrs init` make of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest

from taidon_proxy.app import Proxy
from taidon_proxy.cli.main import serve_config
from taidon_proxy.config import AdminConfig
from taidon_proxy.config_load import parse_config
from taidon_proxy.discovery import discover
from taidon_proxy.errors import ConfigError
from tests.conftest import REPO, SHARED_TESTDATA

pytestmark = pytest.mark.integration

SQLRS = REPO / ".venv" / "bin" / "sqlrs"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


FLYWAY = {
    "db/migration/V1__init.sql": "create table item (id int primary key);\n",
    "db/migration/V2__name.sql": "alter table item add column name text;\n",
    "db/migration/V9__big.sql": "create table big (id int);\n",
    "db/migration/V10__note.sql": "alter table big add column note text;\n",  # after V9
    "db/migration/V10_1__more.sql": "alter table big add column more int;\n",  # 10.1
    "db/migration/R__views.sql": "create or replace view v as select * from item;\n",
    "db/migration/notes.sql": "-- not a migration name\n",
}


def test_flyway_migrations_run_in_version_order_then_repeatables(pg_dir: Path) -> None:
    found = discover(write(pg_dir / "shop", FLYWAY))
    (c,) = found.candidates
    assert c.layout == "Flyway-style versioned SQL" and found.alias == "shop"
    assert [Path(f).name for f in c.prepare["files"]] == [
        "V1__init.sql", "V2__name.sql", "V9__big.sql", "V10__note.sql", "V10_1__more.sql",
        "R__views.sql",
    ]  # fmt: skip
    assert any("notes.sql" in n for n in found.notes)


def test_two_migrations_with_one_version_are_named(pg_dir: Path) -> None:
    root = write(pg_dir / "r", {"db/migration/V1__a.sql": "", "db/migration/V1_0__b.sql": ""})
    with pytest.raises(ConfigError, match=r"two migrations with version 1\b.*V1__a.sql"):
        discover(root)


def test_spring_boot_and_jhipster_liquibase_layouts(pg_dir: Path) -> None:
    boot = write(pg_dir / "boot", {
        "src/main/resources/db/changelog/db.changelog-master.yaml": "databaseChangeLog: []\n",
    })  # fmt: skip
    (c,) = discover(boot).candidates
    assert c.layout == "Spring Boot Liquibase"
    assert c.prepare == {
        "kind": "lb", "search_path": ["src/main/resources"],
        "changelog": "db/changelog/db.changelog-master.yaml",
    }  # fmt: skip
    jh = pg_dir / "bank"
    shutil.copytree(
        SHARED_TESTDATA / "jhipster-liquibase" / "config",
        jh / "src" / "main" / "resources" / "config",
    )
    (c,) = discover(jh).candidates
    assert c.layout == "JHipster Liquibase"
    assert c.prepare["changelog"] == "config/liquibase/master.xml"


def test_supabase_and_plain_layouts(pg_dir: Path) -> None:
    supa = write(pg_dir / "supa", {
        "supabase/migrations/20240102000000_two.sql": "",
        "supabase/migrations/20240101000000_one.sql": "",
        "supabase/seed.sql": "",
    })  # fmt: skip
    (c,) = discover(supa).candidates
    assert c.layout == "Supabase"
    assert c.prepare["files"] == [
        "supabase/migrations/20240101000000_one.sql",
        "supabase/migrations/20240102000000_two.sql",
        "supabase/seed.sql",
    ]
    plain = write(pg_dir / "plain", {"migrations/10_c.sql": "", "migrations/2_b.sql": "",
                                     "migrations/001_a.sql": "", "seed.sql": ""})  # fmt: skip
    (c,) = discover(plain).candidates
    assert c.prepare["files"] == [
        "migrations/001_a.sql", "migrations/2_b.sql", "migrations/10_c.sql", "seed.sql",
    ]  # fmt: skip


def test_the_alias_is_the_repositorys_name_from_a_subdirectory(pg_dir: Path) -> None:
    repo = pg_dir / "my shop"
    write(repo, {"api/schema.sql": "create table t (x int);\n"})
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert discover(repo / "api").alias == "my-shop"


def test_two_layouts_are_reported_not_guessed(pg_dir: Path) -> None:
    root = write(pg_dir / "both", {"schema.sql": "", **FLYWAY})
    r = subprocess.run(
        [str(SQLRS), "serve"], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode != 0
    assert "2 candidate migration layouts" in r.stderr
    assert "Flyway-style versioned SQL" in r.stderr and "schema and seed: schema.sql" in r.stderr
    assert "Traceback" not in r.stderr
    # init writes both, commented out, and a config that loads with no database.
    r = subprocess.run([str(SQLRS), "init"], cwd=root, capture_output=True, text=True,
                       timeout=60, check=True)  # fmt: skip
    text = (root / "taidon.yaml").read_text()
    assert "# found: Flyway-style versioned SQL" in text and "# found: schema and seed" in text
    assert parse_config(text, source=root / "taidon.yaml").databases == {}


def test_nothing_found_names_where_it_looked(pg_dir: Path) -> None:
    root = write(pg_dir / "empty", {"README.md": "hello\n"})
    r = subprocess.run(
        [str(SQLRS), "serve"], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode != 0 and "no migrations found" in r.stderr
    assert "db/migration/V*__*.sql" in r.stderr and "sqlrs init" in r.stderr


async def test_a_bare_serve_serves_the_discovered_migrations(
    pg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write(pg_dir / "shop", FLYWAY)
    monkeypatch.chdir(root)
    cfg = serve_config(root / "taidon.yaml", given=False)
    assert cfg.store == root / ".taidon" / "store"
    # The discovered config as is, on free ports (the defaults may be taken on this machine).
    cfg = cfg.model_copy(update={"listen": "127.0.0.1:0", "admin": AdminConfig(listen=None)})
    proxy = await Proxy.open(cfg)
    try:
        await proxy.start()
        assert proxy.server is not None
        conn = await asyncpg.connect(f"postgresql://postgres@{proxy.server.addresses[0]}/shop")
        try:
            cols = await conn.fetch(
                "select column_name from information_schema.columns"
                " where table_name = 'big' order by ordinal_position"
            )
            assert [r[0] for r in cols] == ["id", "note", "more"]
            assert await conn.fetchval("select count(*) from v") == 0
        finally:
            await conn.close()
    finally:
        await proxy.close()


def test_init_writes_the_discovered_recipe_and_it_loads(pg_dir: Path) -> None:
    root = write(pg_dir / "shop", FLYWAY)
    r = subprocess.run([str(SQLRS), "--json", "init"], cwd=root, capture_output=True,
                       text=True, timeout=60, check=True)  # fmt: skip
    assert '"layout": "Flyway-style versioned SQL"' in r.stdout
    cfg = parse_config((root / "taidon.yaml").read_text(), source=root / "taidon.yaml")
    assert [f.name for f in cfg.databases["shop"].prepare.files][-1] == "R__views.sql"  # type: ignore[union-attr]
