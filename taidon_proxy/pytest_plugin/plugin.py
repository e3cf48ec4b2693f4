"""The plugin's hooks and fixtures: taidon_database, taidon_dsn, taidon_psycopg, taidon_asyncpg."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from taidon_proxy.pytest_plugin.databases import SESSION, open_database, remove_database
from taidon_proxy.pytest_plugin.endpoint import TaidonDatabase
from taidon_proxy.pytest_plugin.options import Scope, Settings, add_options
from taidon_proxy.pytest_plugin.session import WORKER_INPUT_KEY, TaidonSession


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)  # after xdist has turned -n auto into a number
def pytest_configure(config: pytest.Config) -> None:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    given = workerinput.get(WORKER_INPUT_KEY) if workerinput is not None else None
    workers = getattr(config.option, "numprocesses", None)
    session = TaidonSession(Settings.of(config), int(workers or 0), given)
    config.stash[SESSION] = session
    if config.pluginmanager.hasplugin("django"):
        from taidon_proxy.pytest_plugin import django

        config.pluginmanager.register(django, "taidon-django")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Every test database is gone before the run ends; a failed removal is named."""
    taidon = session.config.stash.get(SESSION, None)
    if taidon is None:
        return
    problems = taidon.wait_removals()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in problems:
        if reporter is not None:
            reporter.write_line(f"taidon: {line}", red=True)
    if problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION, None)
    if session is not None:
        session.close()  # the embedded proxy, if this process started one


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker gets the one proxy (found or started here, once)."""
    node.workerinput[WORKER_INPUT_KEY] = node.config.stash[SESSION].for_worker()


def _scope(fixture_name: str, config: pytest.Config) -> Scope:
    return config.stash[SESSION].settings.scope


@pytest.fixture(scope=_scope)
def taidon_database(request: pytest.FixtureRequest) -> Iterator[TaidonDatabase]:
    """A fresh database of the recipe's current state, for the scope of taidon_scope; its
    instance is removed when that scope ends."""
    db = open_database(request)
    yield db
    remove_database(request, db)


@pytest.fixture(scope=_scope)
def taidon_dsn(taidon_database: TaidonDatabase) -> str:
    """The fresh database as a libpq URL (postgresql://user@host:port/ALIAS%3ALABEL)."""
    return taidon_database.dsn


@pytest.fixture
def taidon_psycopg(taidon_database: TaidonDatabase) -> Iterator[Any]:
    """A psycopg connection to the fresh database (psycopg's defaults: commit to keep)."""
    import psycopg

    conn = psycopg.connect(**taidon_database.psycopg_kwargs())
    try:
        yield conn
    finally:
        conn.close()


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is what runs async fixtures

    @pytest.fixture
    def taidon_asyncpg() -> None:
        """An asyncpg connection to the fresh database (needs pytest-asyncio)."""
        pytest.fail("taidon_asyncpg needs pytest-asyncio installed", pytrace=False)

else:

    @pytest_asyncio.fixture
    async def taidon_asyncpg(  # type: ignore[misc]  # the definition with pytest-asyncio
        taidon_database: TaidonDatabase,
    ) -> AsyncIterator[Any]:
        """An asyncpg connection to the fresh database, on the test's event loop."""
        import asyncpg

        conn = await asyncpg.connect(**taidon_database.asyncpg_kwargs())
        try:
            yield conn
        finally:
            await conn.close()
