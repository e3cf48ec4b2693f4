"""With pytest-django: Django's test database is a fresh database of the recipe's state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from taidon_proxy.pytest_plugin.databases import open_database, remove_database


@pytest.fixture(scope="session")
def django_db_setup(request: pytest.FixtureRequest, django_db_blocker: Any) -> Iterator[None]:
    """Instead of creating test_<NAME> and migrating it: the `default` database is pointed
    at a fresh instance of the recipe (one per session and xdist worker), which already has
    the schema the recipe built. Tests roll back (django_db) or flush (transaction=True) as
    usual; the instance is removed at the end of the session."""
    from django.conf import settings
    from django.db import connections

    db = open_database(request, "django-")
    conn = connections["default"]
    entry: dict[str, Any] = {"NAME": db.name, "HOST": db.host, "PORT": str(db.port)}
    if not conn.settings_dict.get("USER"):
        entry["USER"] = db.user
    with django_db_blocker.unblock():
        conn.close()
    conn.settings_dict.update(entry)
    settings.DATABASES["default"].update(entry)
    try:
        yield
    finally:
        with django_db_blocker.unblock():
            connections.close_all()
        remove_database(request, db)
