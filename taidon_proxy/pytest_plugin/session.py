"""One pytest process's link to the proxy: which one, started when, labels, and teardown."""

from __future__ import annotations

import itertools
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from taidon_proxy.admin.auth import read_token
from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.pytest_plugin.embedded import EmbeddedProxy
from taidon_proxy.pytest_plugin.endpoint import (
    LABEL_PREFIX,
    Endpoint,
    TaidonDatabase,
    TaidonPluginError,
    call,
    healthy,
)
from taidon_proxy.pytest_plugin.options import Settings

WORKER_INPUT_KEY = "taidon"
# Removals run beside the next tests (the proxy stops the server and drops the clone while
# the test process goes on); they are all awaited at the end of the session.
REMOVERS = 2


class TaidonSession:
    """Finds the proxy once (lazily: a run without the fixtures starts nothing) and hands out
    databases whose labels are unique to this run, this xdist worker and this request.

    Which proxy: `--taidon-url` / $TAIDON_URL / ini `taidon_url`; else the config's own
    proxy if its admin endpoint answers; else an embedded one, started here and stopped by
    `close`. Under xdist the controller finds it and gives it to the workers.
    """

    def __init__(self, settings: Settings, workers: int, given: dict[str, Any] | None) -> None:
        self.settings = settings
        self.workers = workers
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.run = secrets.token_hex(3)
        self._counter = itertools.count(1)
        self._given = given  # from the xdist controller: an endpoint, or the error it got
        self._endpoint: Endpoint | None = None
        self._error: str | None = None
        self.embedded: EmbeddedProxy | None = None
        self._removers: ThreadPoolExecutor | None = None
        self._removals: list[tuple[TaidonDatabase, Future[bool]]] = []

    def endpoint(self) -> Endpoint:
        if self._endpoint is not None:
            return self._endpoint
        if self._error is not None:
            raise TaidonPluginError(self._error)
        try:
            if self._given is not None:
                if self._given.get("error"):
                    raise TaidonPluginError(self._given["error"])
                self._endpoint = Endpoint.from_json(self._given["endpoint"])
            else:
                self._endpoint = self._find()
        except TaidonPluginError as e:
            self._error = e.message  # every later test gets the same reason at once
            raise
        return self._endpoint

    def for_worker(self) -> dict[str, Any]:
        """What an xdist worker gets: the endpoint, or why there is none."""
        try:
            return {"endpoint": self.endpoint().to_json()}
        except TaidonPluginError as e:
            return {"error": e.message}

    def _find(self) -> Endpoint:
        s = self.settings
        if s.url is not None:
            return Endpoint.discover(s.url, os.environ.get("TAIDON_TOKEN") or self._token())
        if not s.config_path.exists():
            why = "does not exist" if s.config_given else "was not found"
            raise TaidonPluginError(
                f"taidon: config {s.config_path} {why}; pass --taidon-config or set"
                " taidon_config (or --taidon-url for a running proxy)"
            )
        try:
            cfg = load_config(s.config_path, check=False)
        except ConfigError as e:
            raise TaidonPluginError(f"taidon: {e.message}") from None
        if cfg.admin.listen is not None:
            url = f"http://{cfg.admin.listen}"
            running = self._running_on(url, cfg.store)
            if running is not None:  # never a second proxy on the same store
                return running
        warm = s.warm if s.warm is not None else max(1, self.workers)
        self.embedded = EmbeddedProxy(s.config_path, warm)
        return self.embedded.start()

    @staticmethod
    def _running_on(url: str, store: Path) -> Endpoint | None:
        """The proxy at the config's admin address, if one answers there and runs on the
        config's store (another project's proxy on the default port is not ours)."""
        if not healthy(url):
            return None
        token = read_token(store)
        try:
            status = call(url, token, "GET", "/v1/status")
        except TaidonPluginError:  # its token is not our store's: another store
            return None
        if Path(str(status.get("store"))) != store:
            return None
        return Endpoint.of_status(url, token, status)

    def _token(self) -> str | None:
        if not self.settings.config_path.exists():
            return None
        try:
            return read_token(load_config(self.settings.config_path, check=False).store)
        except ConfigError:
            return None

    def alias(self) -> str:
        if self.settings.alias is not None:
            return self.settings.alias
        aliases = self.endpoint().aliases
        if len(aliases) == 1:
            return aliases[0]
        raise TaidonPluginError(
            f"taidon: the proxy serves {len(aliases)} aliases ({', '.join(aliases) or 'none'});"
            " name one with taidon_alias in the ini file or --taidon-alias"
        )

    def label(self, kind: str = "") -> str:
        """pytest-<worker>-<run>-<n>: unique per request, worker and run (labels a killed
        run left behind are never reused)."""
        return f"{LABEL_PREFIX}{self.worker}-{self.run}-{kind}{next(self._counter)}"

    def new_database(self, kind: str = "") -> TaidonDatabase:
        endpoint = self.endpoint()
        return endpoint.database(self.alias(), self.label(kind), self.settings.user)

    def remove_later(self, db: TaidonDatabase) -> None:
        """Remove a database's instance without waiting for it (see `wait_removals`)."""
        if self._removers is None:
            self._removers = ThreadPoolExecutor(REMOVERS, thread_name_prefix="taidon-remove")
        self._removals.append((db, self._removers.submit(self.endpoint().remove, db)))
        self._removals = [(d, f) for d, f in self._removals if not f.done() or f.exception()]

    def wait_removals(self) -> list[str]:
        """Wait for every removal; the problems, one line each."""
        problems = []
        for db, future in self._removals:
            try:
                future.result()
            except TaidonPluginError as e:
                problems.append(f"could not remove {db.name}: {e.message}")
        self._removals = []
        if self._removers is not None:
            self._removers.shutdown()
            self._removers = None
        return problems

    def close(self) -> None:
        self.wait_removals()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
