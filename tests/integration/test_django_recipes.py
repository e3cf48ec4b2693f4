"""django recipes through the proxy: a real Django 5.2 project with two apps, a data migration,
a cross-app dependency; edits, appends, and each kind of bad input."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import django
import pytest

from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError
from tests.conftest import ProxyFactory, RunningProxy, processes_under
from tests.recipe_helpers import builder, fetch, jobs, steps_run

pytestmark = pytest.mark.integration

MANAGE = """#!/usr/bin/env python
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

BASE = """SECRET_KEY = "not-a-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
"""

# The project's own database is somewhere the build must never go: the proxy's bootstrap
# points DATABASES['default'] at its build server whatever this says.
SETTINGS = """import os

from mysite.base import *  # noqa: F403 - settings split in two, both files are hashed

TWELVE_FACTOR_URL = os.environ["DATABASE_URL"]  # read at import, as twelve-factor apps do
INSTALLED_APPS = ["catalog", "orders"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "production",
        "USER": "app",
        "PASSWORD": "secret",
        "HOST": "db.invalid",
        "PORT": "1",
        "OPTIONS": {"options": "-c statement_timeout=60000"},
    }
}
"""

MIGRATION = """from django.db import migrations, models
{imports}

{code}

class Migration(migrations.Migration):
    dependencies = {deps!r}
    operations = [
{ops}
    ]
"""

CREATE_PRODUCT = """        migrations.CreateModel(
            name="Product",
            fields=[
                ("id", models.BigAutoField(primary_key=True)),
                ("name", models.CharField(max_length=50)),
            ],
        ),"""

SEED = """def seed(apps, schema_editor):
    Product = apps.get_model("catalog", "Product")
    for name in {names!r}:
        Product.objects.create(name=name)
    print("seeded", len({names!r}))"""

CREATE_ORDER = """        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.BigAutoField(primary_key=True)),
                ("product", models.ForeignKey("catalog.Product", on_delete=models.CASCADE)),
            ],
        ),"""

NAMES = ["alpha", "beta", "gamma"]


def migration(ops: str, deps: list[tuple[str, str]], code: str = "", imports: str = "") -> str:
    return MIGRATION.format(ops=ops, deps=deps, code=code, imports=imports)


def write_migration(base: Path, app: str, name: str, text: str) -> None:
    (base / app / "migrations" / f"{name}.py").write_text(text)


def seed_migration(names: list[str]) -> str:
    return migration(
        "        migrations.RunPython(seed, migrations.RunPython.noop),",
        [("catalog", "0001_initial")],
        code=SEED.format(names=names),
    )


def write_project(root: Path, per: str = "migration", src: bool = False) -> dict[str, Any]:
    """catalog 0001 → 0002 (data) → 0003 (needs orders 0001); orders 0001 (needs catalog 0002)
    → 0002. Django's plan: catalog.0001, catalog.0002, orders.0001, catalog.0003, orders.0002.
    src: the packages live under src/ (a src layout), found through `pythonpath`."""
    (root / "manage.py").write_text(MANAGE)
    base = root / "src" if src else root
    (base / "mysite").mkdir(parents=True)
    (base / "mysite/__init__.py").write_text("")
    (base / "mysite/base.py").write_text(BASE)
    (base / "mysite/settings.py").write_text(SETTINGS)
    for app in ("catalog", "orders"):
        (base / app / "migrations").mkdir(parents=True)
        (base / app / "__init__.py").write_text("")
        (base / app / "migrations/__init__.py").write_text("")
    write_migration(base, "catalog", "0001_initial", migration(CREATE_PRODUCT, []))
    write_migration(base, "catalog", "0002_seed", seed_migration(NAMES))
    sku = '        migrations.AddField("product", "sku", models.CharField(max_length=9, default="none")),'  # noqa: E501
    write_migration(
        base, "catalog", "0003_product_sku",
        migration(sku, [("catalog", "0002_seed"), ("orders", "0001_initial")]),
    )  # fmt: skip
    write_migration(
        base, "orders", "0001_initial", migration(CREATE_ORDER, [("catalog", "0002_seed")])
    )
    note = '        migrations.AddField("order", "note", models.TextField(default="")),'
    write_migration(
        base, "orders", "0002_order_note", migration(note, [("orders", "0001_initial")])
    )
    prepare = {"kind": "django", "manage": "manage.py", "settings": "mysite.settings", "per": per}
    return {"prepare": {**prepare, "pythonpath": ["src"]} if src else prepare}


PLAN = ["catalog.0001_initial", "catalog.0002_seed", "orders.0001_initial",
        "catalog.0003_product_sku", "orders.0002_order_note"]  # fmt: skip


async def psql(p: RunningProxy, database: str, sql: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", p.host, "-p", str(p.port),
        "-U", "postgres", "-d", database, "-c", sql,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out
    return out.decode()


def project_venv(path: Path) -> Path:
    """A virtualenv of its own whose packages are this one's (Django without a download)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    [site] = path.glob("lib/python*/site-packages")
    (site / "shared.pth").write_text(str(Path(django.__file__).parent.parent) + "\n")
    return path / "bin/python"


def runners_under(path: Path) -> list[int]:
    """Our runner processes still alive for the project under path."""
    alive = []
    for pid in processes_under(path):
        with contextlib.suppress(OSError):
            if b"pytool_entry" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
    return alive


async def django_states(p: RunningProxy, alias: str) -> list[str]:
    """The labels of the alias's django states (each test has its own alias, so its own root)."""
    assert p.proxy.store is not None
    rows = await p.proxy.store.meta.states()
    return [r.label for r in rows if r.kind == "django" and r.alias == alias]


async def refused(p: RunningProxy, database: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as e:
        await asyncpg.connect(p.dsn(database))
    assert e.value.sqlstate == "58000", e.value
    return e.value


async def test_one_state_per_migration_edit_in_the_middle_and_append(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"shop": write_project(pg_dir)}, store=store)
    assert await fetch(p, "shop", "select name, sku from catalog_product order by id") == [
        ("alpha", "none"), ("beta", "none"), ("gamma", "none"),
    ]  # fmt: skip
    assert await fetch(p, "shop", "select count(*) from orders_order where note = ''") == [(0,)]
    applied = await fetch(p, "shop", "select app || '.' || name from django_migrations order by id")
    assert applied == [(m,) for m in PLAN]
    [job] = jobs(p, "shop")
    assert steps_run(job) == PLAN  # Django's order, the cross-app dependencies honoured
    progress = [e.message for e in job.events if e.kind == "progress"]
    assert any(m.endswith("seeded 3") for m in progress), progress  # the migration's print
    labels = await django_states(p, "shop")
    assert len(labels) == 5 and all(f"(Django {django.get_version()})" in x for x in labels)
    plan = await builder(p).plan("shop")
    assert [s.label.split()[0] for s in plan] == PLAN and all(s.cached for s in plan)
    before = [s.state_id for s in plan]

    # Editing the data migration (2nd of 5) rebuilds from state 1: it and the three after it.
    write_migration(pg_dir, "catalog", "0002_seed", seed_migration([*NAMES, "delta"]))
    assert await fetch(p, "shop:edited", "select count(*) from catalog_product") == [(4,)]
    assert steps_run(jobs(p, "shop")[-1]) == PLAN[1:]
    after = [s.state_id for s in await builder(p).plan("shop")]
    assert after[0] == before[0] and not set(after[1:]) & set(before)
    assert len(await django_states(p, "shop")) == 5 + 4

    # Appending a migration runs one step. Its name starts another's (0002_order_note), which
    # Django's `migrate orders 0002_order` alone would refuse as ambiguous.
    tag = '        migrations.AddField("order", "tag", models.TextField(default="t")),'
    write_migration(pg_dir, "orders", "0002_order", migration(tag, [("orders", "0002_order_note")]))
    assert await fetch(p, "shop:appended", "select count(*) from orders_order") == [(0,)]
    assert steps_run(jobs(p, "shop")[-1]) == ["orders.0002_order"]
    assert len(await django_states(p, "shop")) == 5 + 4 + 1
    # psql sees the same database.
    out = await psql(p, "shop:appended", "select name from catalog_product order by id")
    assert out.split() == [*NAMES, "delta"]


async def test_per_app_steps_and_a_failing_migration_is_named_and_not_stored(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    recipe = write_project(pg_dir, per="app")
    failing = migration(
        "        migrations.RunPython(seed, migrations.RunPython.noop),",
        [("catalog", "0001_initial")],
        code="def seed(apps, schema_editor):\n    raise ValueError('no price list for alpha')",
    )
    write_migration(pg_dir, "catalog", "0002_seed", failing)
    p = await make_proxy({"perapp": recipe}, store=store)
    plan = await builder(p).plan("perapp")
    assert [s.label for s in plan] == [
        "catalog.0001_initial..0002_seed (2 migrations)",
        "orders.0001_initial orders/migrations/0001_initial.py",
        "catalog.0003_product_sku catalog/migrations/0003_product_sku.py",
        "orders.0002_order_note orders/migrations/0002_order_note.py",
    ]
    e = await refused(p, "perapp")
    message = str(e)
    assert (
        "migration catalog.0002_seed (catalog/migrations/0002_seed.py) failed: "
        "ValueError: no price list for alpha (catalog/migrations/0002_seed.py:" in message
    ), message
    assert str(pg_dir) not in message + (e.detail or "")
    [job] = jobs(p, "perapp")
    assert job.status == "failed"
    assert (
        await django_states(p, "perapp") == []
    )  # the step's first migration did apply: still nothing
    assert not any(s.cached for s in await builder(p).plan("perapp"))

    # Fixed, the per-app recipe builds its four steps.
    write_migration(pg_dir, "catalog", "0002_seed", seed_migration(NAMES))
    # The remembered failure ends with the edit of a file it read, not at its TTL.
    assert await fetch(p, "perapp:fixed", "select count(*) from catalog_product") == [(3,)]
    assert len(steps_run(jobs(p, "perapp")[-1])) == 4


async def test_a_settings_import_error_names_the_module_and_the_error(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    recipe = write_project(pg_dir)
    settings = pg_dir / "mysite/settings.py"
    settings.write_text("import os\nimport mysite.integrations  # not written yet\n" + SETTINGS)
    p = await make_proxy({"badsettings": recipe}, store=store)
    e = await refused(p, "badsettings")
    assert e.message == (
        "django plan failed: settings mysite.settings cannot be imported: ModuleNotFoundError:"
        " No module named 'mysite.integrations' (mysite/settings.py:2)"
    ), e.message
    assert jobs(p, "badsettings")[-1].status == "failed"
    assert await django_states(p, "badsettings") == []
    # The module written (beside the settings) ends the remembered failure: its own error now.
    (pg_dir / "mysite/integrations.py").write_text("raise RuntimeError('no API key')\n")
    e = await refused(p, "badsettings")
    assert e.message.endswith(
        "cannot be imported: RuntimeError: no API key (mysite/integrations.py:1)"
    ), e.message
    # Settings that import, naming an app that does not: django.setup() fails.
    settings.write_text(SETTINGS.replace('"orders"]', '"orders", "shopp"]'))
    e = await refused(p, "badsettings")
    assert e.message == (
        "django plan failed: django.setup() with settings mysite.settings failed:"
        " ModuleNotFoundError: No module named 'shopp'"
    ), e.message


async def test_conflicting_leaf_migrations_are_named(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    recipe = write_project(pg_dir)
    other = '        migrations.AddField("order", "other", models.TextField(default="")),'
    write_migration(pg_dir, "orders", "0002_other", migration(other, [("orders", "0001_initial")]))
    p = await make_proxy({"conflict": recipe}, store=store)
    e = await refused(p, "conflict")
    assert (
        "Conflicting migrations detected; multiple leaf nodes in the migration graph: "
        "(0002_order_note, 0002_other in orders). To fix them run "
        "'python manage.py makemigrations --merge'" in str(e)
    ), str(e)
    assert jobs(p, "conflict")[-1].status == "failed"
    assert await django_states(p, "conflict") == []
    # A change in a migration directory the failure read ends its memory at once (not at
    # its TTL): the next connection plans again and hears of the new leaf.
    (pg_dir / "orders/migrations/0002_other.py").rename(pg_dir / "orders/migrations/0002_third.py")
    e = await refused(p, "conflict")
    assert "(0002_order_note, 0002_third in orders)" in e.message, e.message
    # So does an edit of a migration: a dependency on a migration that does not exist.
    missing = migration(other, [("orders", "0002_order_note"), ("catalog", "0009_missing")])
    write_migration(pg_dir, "orders", "0002_third", missing)
    e = await refused(p, "conflict")
    assert e.message == (
        "django plan failed: loading the migrations failed: django.db.migrations.exceptions."
        "NodeNotFoundError: Migration orders.0002_third dependencies reference nonexistent"
        " parent node ('catalog', '0009_missing')"
    ), e.message
    assert len(jobs(p, "conflict")) == 3


async def test_a_hanging_migration_is_killed_at_the_timeout(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    recipe = write_project(pg_dir, src=True)  # and a src layout, and the project's own venv
    recipe["prepare"].update(timeout="3s", python=str(project_venv(pg_dir / "venv")))
    hang = migration(
        "        migrations.RunPython(wait, migrations.RunPython.noop),",
        [("catalog", "0001_initial")],
        code="def wait(apps, schema_editor):\n    print('waiting in', sys.prefix, flush=True)\n"
        "    time.sleep(120)",
        imports="import sys\nimport time",
    )
    write_migration(pg_dir / "src", "catalog", "0002_seed", hang)
    p = await make_proxy({"hang": recipe}, store=store)
    e = await refused(p, "hang")
    assert e.message == (
        "migration catalog.0002_seed (src/catalog/migrations/0002_seed.py) failed:"
        " timed out after 3s"
    ), e.message
    # Its output so far, from the recipe's interpreter (paths shown relative to the config).
    assert "Applying catalog.0002_seed...waiting in venv" in (e.detail or ""), e.detail
    assert not runners_under(pg_dir)  # the killed runner's process group is gone
    assert jobs(p, "hang")[-1].status == "failed"
    labels = await django_states(p, "hang")
    assert len(labels) == 1 and labels[0].startswith("catalog.0001_initial ")


def test_bad_django_recipes_are_refused_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "taidon.yaml"
    cfg.write_text(
        "databases:\n  a:\n    prepare:\n      kind: django\n      manage: nope.py\n"
        "      settings: mysite/settings.py\n      pythonpath: [src]\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    missing = tmp_path.resolve() / "nope.py"
    assert e.value.message == (
        f"{cfg}:5: databases.a.prepare.manage: {missing}: no such file\n"
        f"{cfg}:6: databases.a.prepare.settings: 'mysite/settings.py' is not a module name"
        " (dotted, like mysite.settings; not a file path)\n"
        f"{cfg}:7: databases.a.prepare.pythonpath.0: {tmp_path.resolve() / 'src'}:"
        " no such directory"
    )
