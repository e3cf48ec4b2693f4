"""The django plan: steps per migration or per app run, what each step hash covers, the check
against django_migrations, and how the bootstrap points the database and describes errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from taidon_proxy.config import DjangoPrepare
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare.chain import state_ids
from taidon_proxy.prepare.django import runner
from taidon_proxy.prepare.django.adapter import DjangoStep, check_applied, hash_plan

pytestmark = pytest.mark.unit

ORDER = [("a", "0001_x"), ("a", "0002_y"), ("b", "0001_x"), ("a", "0003_z"), ("b", "0002_y")]


def project(base: Path) -> dict[str, Any]:
    """Files as a plan answer names them (the runner's answer, without Django running)."""
    (base / "mysite").mkdir()
    (base / "mysite/settings.py").write_text("from mysite.base import *\n")
    (base / "mysite/base.py").write_text("SECRET_KEY = 'x'\n")
    (base / "manage.py").write_text("# manage\n")
    migrations = []
    for app, name in ORDER:
        d = base / app / "migrations"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.py").write_text(f"# {app} {name}\n")
        migrations.append({"app": app, "name": name, "path": str(d / f"{name}.py")})
    return {
        "django_version": "5.2.19",
        "django_file": str(base / "django-init.py"),
        "settings_files": [str(base / "mysite/base.py"), str(base / "mysite/settings.py")],
        "migrations": migrations,
        "dirs": [str(base / "a/migrations"), str(base / "b/migrations")],
    }


def prep(base: Path, **kw: Any) -> DjangoPrepare:
    return DjangoPrepare(kind="django", manage=base / "manage.py", settings="mysite.settings", **kw)


def hashes(base: Path, answer: dict[str, Any], **kw: Any) -> list[str]:
    return [s.chain.step_hash for s in hash_plan(prep(base, **kw), base, answer).steps]


def test_one_step_per_migration_in_djangos_order_with_the_version_in_the_label(
    tmp_path: Path,
) -> None:
    p = hash_plan(prep(tmp_path), tmp_path, project(tmp_path))
    assert [(s.app, s.target) for s in p.steps] == ORDER
    assert p.steps[1].chain.name == "a.0002_y a/migrations/0002_y.py"
    assert p.steps[1].chain.label == "a.0002_y a/migrations/0002_y.py (Django 5.2.19)"
    assert str(tmp_path / "mysite/base.py") in p.inputs and str(tmp_path / "manage.py") in p.inputs
    assert str(tmp_path / "a/migrations") in p.inputs  # a new migration file misses the fast path


def test_per_app_steps_are_runs_of_one_app_split_where_another_app_comes_between(
    tmp_path: Path,
) -> None:
    p = hash_plan(prep(tmp_path, per="app"), tmp_path, project(tmp_path))
    assert [(s.app, s.target, len(s.migrations)) for s in p.steps] == [
        ("a", "0002_y", 2), ("b", "0001_x", 1), ("a", "0003_z", 1), ("b", "0002_y", 1),
    ]  # fmt: skip
    assert p.steps[0].chain.name == "a.0001_x..0002_y (2 migrations)"
    # A failure is pinned on the migration the runner saw being applied, else the last.
    assert p.steps[0].failing("a.0001_x").name == "0001_x"
    assert p.steps[0].failing(None).name == "0002_y"


def test_an_edit_changes_that_steps_id_and_every_later_one_only(tmp_path: Path) -> None:
    answer = project(tmp_path)
    first = hash_plan(prep(tmp_path), tmp_path, answer).steps
    (tmp_path / "b/migrations/0001_x.py").write_text("# edited\n")
    edited = hash_plan(prep(tmp_path), tmp_path, answer).steps
    same = [a.chain.step_hash == b.chain.step_hash for a, b in zip(first, edited, strict=True)]
    assert same == [True, True, False, True, True]
    before = state_ids("root", "django", [s.chain for s in first])
    after = state_ids("root", "django", [s.chain for s in edited])
    assert before[:2] == after[:2] and not set(before[2:]) & set(after[2:])


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (lambda b, a: (b / "mysite/base.py").write_text("SECRET_KEY = 'y'\n"), "a settings file"),
        (lambda b, a: a.update(django_version="5.2.20"), "Django's version"),
    ],
)
def test_what_every_step_hash_covers(tmp_path: Path, change: Any, what: str) -> None:
    answer = project(tmp_path)
    first = hashes(tmp_path, answer)
    change(tmp_path, answer)
    assert not set(hashes(tmp_path, answer)) & set(first), what


def test_options_change_every_hash(tmp_path: Path) -> None:
    answer = project(tmp_path)
    first = hashes(tmp_path, answer)
    other = DjangoPrepare(kind="django", manage=tmp_path / "manage.py", settings="mysite.other")
    renamed = [s.chain.step_hash for s in hash_plan(other, tmp_path, answer).steps]
    assert not set(renamed) & set(first)
    assert not set(hashes(tmp_path, answer, pythonpath=[tmp_path / "src"])) & set(first)
    per_app = hashes(tmp_path, answer, per="app")
    assert not set(per_app) & set(first)  # even a one-migration step of another mode
    # The interpreter and the timeout change how it runs, not what it builds.
    assert hashes(tmp_path, answer, timeout=5, python=tmp_path / "py") == first


def test_a_migration_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    answer = project(tmp_path)
    (tmp_path / "a/migrations/0003_z.py").unlink()
    with pytest.raises(BuildFailed, match=r"cannot read a/migrations/0003_z.py: No such file"):
        hash_plan(prep(tmp_path), tmp_path, answer)


def _steps(tmp_path: Path) -> list[DjangoStep]:
    return hash_plan(prep(tmp_path, per="app"), tmp_path, project(tmp_path)).steps


def test_the_applied_set_must_be_the_plan_so_far(tmp_path: Path) -> None:
    steps = _steps(tmp_path)
    check_applied(steps, 1, [["a", "0001_x"], ["a", "0002_y"], ["b", "0001_x"], ["c", "other"]])
    with pytest.raises(BuildFailed, match=r"migrate b 0001_x left a\.0002_y unapplied"):
        check_applied(steps, 1, [["a", "0001_x"], ["b", "0001_x"]])
    with pytest.raises(BuildFailed, match=r"also applied a\.0003_z, planned for later steps"):
        check_applied(
            steps, 1, [["a", "0001_x"], ["a", "0002_y"], ["b", "0001_x"], ["a", "0003_z"]]
        )


def test_the_bootstrap_points_default_at_the_build_server_and_keeps_the_rest() -> None:
    db = {"host": "/run/sock", "port": 5999, "name": "shop", "user": "postgres"}
    project_default = {
        "ENGINE": "django.contrib.gis.db.backends.postgis", "NAME": "prod", "USER": "app",
        "PASSWORD": "secret", "HOST": "db.example", "PORT": "5432", "CONN_MAX_AGE": 60,
        "OPTIONS": {"options": "-c search_path=app", "service": "prod", "passfile": "/p",
                    "dbname": "prod", "host": "db.example", "sslmode": "prefer"},
    }  # fmt: skip
    assert runner.build_database(project_default, db) == {
        "ENGINE": "django.contrib.gis.db.backends.postgis", "NAME": "shop", "USER": "postgres",
        "PASSWORD": "", "HOST": "/run/sock", "PORT": "5999", "CONN_MAX_AGE": 60,
        "OPTIONS": {"options": "-c search_path=app", "sslmode": "prefer"},
    }  # fmt: skip
    sqlite = runner.build_database({"ENGINE": "django.db.backends.sqlite3", "NAME": "x.db"}, db)
    assert sqlite["ENGINE"] == "django.db.backends.postgresql" and sqlite["NAME"] == "shop"
    assert runner.build_database({}, db)["ENGINE"] == "django.db.backends.postgresql"


def test_an_error_is_its_last_line_and_the_place_in_the_projects_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tmp_path / "mysite/settings.py"
    settings.parent.mkdir()
    settings.write_text("x = 1\nimport nonexistent_pkg.missing\n")
    code = compile(settings.read_text(), str(settings), "exec")
    with pytest.raises(ImportError) as e:
        exec(code, {})
    error, detail = runner.describe(e.value, str(tmp_path))
    assert error == f"ModuleNotFoundError: No module named 'nonexistent_pkg' ({settings}:2)"
    assert detail is None
    # Outside the project, or in a virtualenv inside it, no place is named.
    assert runner.describe(e.value, str(tmp_path / "elsewhere"))[0].endswith("'nonexistent_pkg'")
    lib = tmp_path / ".venv/lib/python3.11/site-packages/lib.py"
    with pytest.raises(KeyError) as k:
        exec(compile("raise KeyError('k')", str(lib), "exec"), {})
    assert runner.describe(k.value, str(tmp_path)) == ("KeyError: 'k'", None)
    frozen = compile("raise KeyError('f')", "<frozen importlib._bootstrap>", "exec")
    with pytest.raises(KeyError) as f:
        exec(frozen, {})
    monkeypatch.chdir(tmp_path)  # the runner's working directory is the project's
    assert runner.describe(f.value, str(tmp_path)) == ("KeyError: 'f'", None)  # not a file
    multi = ValueError('relation "t" does not exist\nLINE 1: select * from t')
    assert runner.describe(multi, str(tmp_path)) == (
        'ValueError: relation "t" does not exist',
        "LINE 1: select * from t",
    )
    bad = tmp_path / "mysite/broken.py"
    bad.write_text("def f(:\n")
    with pytest.raises(SyntaxError) as s:
        compile(bad.read_text(), str(bad), "exec")
    assert runner.describe(s.value, str(tmp_path))[0].endswith(f"({bad}:1)")
