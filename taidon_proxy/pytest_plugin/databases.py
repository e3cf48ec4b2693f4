"""The run's session (one per pytest process) and opening and removing its test databases;
shared by the plugin's fixtures and its pytest-django fixture."""

from __future__ import annotations

import pytest

from taidon_proxy.pytest_plugin.endpoint import TaidonDatabase, TaidonPluginError
from taidon_proxy.pytest_plugin.session import TaidonSession

SESSION = pytest.StashKey[TaidonSession]()


def session_of(request: pytest.FixtureRequest) -> TaidonSession:
    return request.config.stash[SESSION]


def open_database(request: pytest.FixtureRequest, kind: str = "") -> TaidonDatabase:
    try:
        return session_of(request).new_database(kind)
    except TaidonPluginError as e:
        pytest.fail(e.message, pytrace=False)


def remove_database(request: pytest.FixtureRequest, db: TaidonDatabase) -> None:
    """The instance goes in the background; the session end waits for every removal."""
    session_of(request).remove_later(db)
