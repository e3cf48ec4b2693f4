"""Run inside the project's interpreter: the bootstrap that points Django at the build server,
Django's own migration plan, and one `migrate <app> <name>`.

Loaded by `pytool_entry` (`plan` or `migrate`, with one JSON object of arguments), which writes
the answer after Django's and the migrations' own output. It imports nothing of the proxy.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback
from typing import Any

# Keys of the project's OPTIONS that would send the connection somewhere else (libpq's own
# names: Django passes OPTIONS to the driver, and an OPTIONS dbname wins over NAME).
_ELSEWHERE = ("service", "passfile", "host", "hostaddr", "port", "dbname", "user", "password")
_APPLYING = re.compile(r"Applying (\S+)\.\.\.")


class Failed(Exception):
    """A failure and the answer the proxy gets for it (`pytool_entry` reads taidon_answer)."""

    def __init__(self, error: str, **more: Any) -> None:
        super().__init__(error)
        self.taidon_answer = {"error": error, **more}


def describe(exc: BaseException, project: str) -> tuple[str, str | None]:
    """A traceback's last line (`Type: message`, its first line) with the innermost place in
    the project's own files, and the message's further lines."""
    text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    first, _, rest = text.partition("\n")
    place = _place(exc, project)
    at = f" ({place[0]}:{place[1]})" if place else ""
    return first.strip() + at, rest.strip() or None


def _place(exc: BaseException, project: str) -> tuple[str, int | None] | None:
    """The innermost frame (file, line) in the project's own files, if any."""
    places = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    if isinstance(exc, SyntaxError) and exc.filename:
        places.append((exc.filename, exc.lineno))
    found = None
    for filename, line in places:
        if _own(filename, project):
            found = (os.path.normpath(filename), line)
    return found


def _own(filename: str, project: str) -> bool:
    """A file of the project itself (not of a virtualenv kept inside it, nor a frozen module's
    pseudo-name such as `<frozen importlib._bootstrap>`)."""
    if not os.path.isabs(filename):
        return False
    path = os.path.normpath(filename)
    return path.startswith(project + os.sep) and f"{os.sep}site-packages{os.sep}" not in path


def build_database(project_default: dict[str, Any], db: dict[str, Any]) -> dict[str, Any]:
    """The project's DATABASES['default'] pointed at the build server: host, port, name and
    user replaced; a PostgreSQL engine kept (PostGIS too), any other replaced; OPTIONS kept
    but for the ones that name another server, database, user or password."""
    engine = str(project_default.get("ENGINE") or "")
    if "postgresql" not in engine and "postgis" not in engine:
        engine = "django.db.backends.postgresql"
    options = dict(project_default.get("OPTIONS") or {})
    for key in _ELSEWHERE:
        options.pop(key, None)
    return {
        **project_default,
        "ENGINE": engine,
        "NAME": db["name"],
        "USER": db["user"],
        "PASSWORD": "",
        "HOST": db["host"],
        "PORT": str(db["port"]),
        "OPTIONS": options,
    }


def _origin(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except Exception:  # a parent package that does not import
        return None
    return spec.origin if spec is not None and spec.origin not in (None, "built-in") else None


def _beside(origin: str | None) -> list[str]:
    """A module's file and its directory (where a missing sibling module would appear)."""
    return [origin, os.path.dirname(origin)] if origin else []


def _files(exc: BaseException, project: str, *also: str | None) -> list[str]:
    """The files a failure came from: fixing one of them is worth a new attempt."""
    place = _place(exc, project)
    return [f for f in (*also, place[0] if place else None) if f]


def bootstrap(args: dict[str, Any]) -> dict[str, Any]:
    """Import the settings, point DATABASES['default'] at the build server, django.setup()."""
    project = os.path.abspath(args["project"])
    name = args["settings"]
    # What running manage.py from its directory gives, then django-admin's --pythonpath.
    sys.path[:0] = [project, *args.get("pythonpath", [])]
    os.environ["DJANGO_SETTINGS_MODULE"] = name
    before = set(sys.modules)
    try:
        module = importlib.import_module(name)
    except Exception as e:
        error, detail = describe(e, project)
        raise Failed(
            f"settings {name} cannot be imported: {error}",
            detail=detail, files=_files(e, project, *_beside(_origin(name))),
        ) from None  # fmt: skip
    # The settings' own files: the module and what it imported from the project (a base.py).
    loaded = [getattr(sys.modules.get(m), "__file__", None) for m in set(sys.modules) - before]
    loaded.append(module.__file__)  # the module itself, inside the project or not
    own = sorted(
        {f for f in loaded if isinstance(f, str) and (f == module.__file__ or _own(f, project))}
    )
    import django
    from django.conf import settings

    try:
        databases = dict(settings.DATABASES)
        databases["default"] = build_database(dict(databases.get("default") or {}), args["db"])
        settings.DATABASES = databases
        django.setup()
    except Exception as e:
        error, detail = describe(e, project)
        raise Failed(
            f"django.setup() with settings {name} failed: {error}",
            detail=detail, files=_files(e, project, module.__file__),
        ) from None  # fmt: skip
    return {
        "django_version": django.get_version(),
        "django_file": django.__file__,  # its VERSION: an upgrade misses the fast path
        "settings_files": own,
    }


def plan(args: dict[str, Any]) -> dict[str, Any]:
    """Django's own plan for a fresh database: `MigrationExecutor.migration_plan` of every leaf
    node (what a bare `migrate` applies), in that order, with each migration's file."""
    info = bootstrap(args)
    project = os.path.abspath(args["project"])
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(None)  # no connection: nothing counts as applied
    except Exception as e:  # a migration that does not import, a missing dependency, a cycle
        error, detail = describe(e, project)
        raise Failed(
            f"loading the migrations failed: {error}",
            detail=detail, files=_files(e, project, *_watched_dirs(project)),
        ) from None  # fmt: skip
    loader = executor.loader
    conflicts = loader.detect_conflicts()
    if conflicts:
        names = "; ".join(
            f"{', '.join(sorted(n))} in {app}" for app, n in sorted(conflicts.items())
        )
        raise Failed(  # Django's own words (the migrate command's), on one line
            "Conflicting migrations detected; multiple leaf nodes in the migration graph: "
            f"({names}). To fix them run 'python manage.py makemigrations --merge'",
            # A merge migration, a removed leaf or an edited dependency ends it.
            files=[*_watched_dirs(project), *map(_file_of, loader.disk_migrations.values())],
        )
    steps = executor.migration_plan(loader.graph.leaf_nodes(), clean_start=True)
    migrations = []
    for migration, _backwards in steps:
        path = _file_of(migration)
        migrations.append({"app": migration.app_label, "name": migration.name, "path": path})
    dirs = {os.path.dirname(str(m["path"])) for m in migrations} | set(_watched_dirs(project))
    return {**info, "migrations": migrations, "dirs": sorted(dirs)}


def _file_of(migration: Any) -> str:
    return str(sys.modules[type(migration).__module__].__file__)


def _watched_dirs(project: str) -> list[str]:
    """Every app's migrations directories, and the project's own app directories (where a
    migrations package can appear): a new file in one changes the plan."""
    from django.apps import apps
    from django.db.migrations.loader import MigrationLoader

    dirs = set()
    for config in apps.get_app_configs():
        if _own(config.path, project):
            dirs.add(config.path)
        module_name, _explicit = MigrationLoader.migrations_module(config.label)
        try:
            if module_name and importlib.util.find_spec(module_name) is not None:
                dirs.update(getattr(importlib.import_module(module_name), "__path__", []))
        except Exception:  # a migrations package that does not import: its app dir is watched
            continue
    return sorted(dirs)


class _Watch:
    """`migrate`'s stdout: passed through, remembering the migration being applied."""

    def __init__(self) -> None:
        self.applying: str | None = None

    def write(self, text: str) -> int:
        found = _APPLYING.findall(text)
        if found:
            self.applying = found[-1]
        elif text.lstrip().startswith("OK"):
            self.applying = None
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


def _exact_names_first() -> None:
    """`migrate <app> <name>` takes a name prefix and refuses one that starts several names
    (0002_order when 0002_order_note exists); a step names its migration exactly."""
    from django.db.migrations.loader import MigrationLoader

    by_prefix = MigrationLoader.get_migration_by_prefix

    def exact_first(self: Any, app_label: str, name_prefix: str) -> Any:
        found = self.disk_migrations.get((app_label, name_prefix))
        return found if found is not None else by_prefix(self, app_label, name_prefix)

    MigrationLoader.get_migration_by_prefix = exact_first


def migrate(args: dict[str, Any]) -> dict[str, Any]:
    """`manage.py migrate <app> <name>` on the build server; then every applied migration."""
    bootstrap(args)
    project = os.path.abspath(args["project"])
    from django.core.management import call_command
    from django.db import connections
    from django.db.migrations.recorder import MigrationRecorder

    _exact_names_first()
    out = _Watch()
    try:
        call_command(
            "migrate", args["app"], args["name"], interactive=False, verbosity=1, stdout=out
        )
    except Exception as e:
        error, detail = describe(e, project)
        raise Failed(error, detail=detail, migration=out.applying) from None
    applied = MigrationRecorder(connections["default"]).applied_migrations()
    return {"applied": sorted([app, name] for app, name in applied)}
