"""The running proxy's config and its life: reload (SIGHUP, the API), drain, stop."""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import structlog

from taidon_proxy.config import Config
from taidon_proxy.config_diff import ConfigChange, diff
from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.instances.manager import InstanceManager
from taidon_proxy.instances.virtual import VirtualDatabases
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.context import RecipeAdapter
from taidon_proxy.services.audit import Audit
from taidon_proxy.store.eviction import Evictor, min_free_bytes

log = structlog.get_logger("taidon.app")
DRAIN_POLL = 0.1


class Listener(Protocol):
    """What the network shell shows the services: its sessions, addresses, and a way to stop
    taking new connections (the services never import the shell)."""

    @property
    def sessions(self) -> Collection[Any]: ...

    @property
    def addresses(self) -> Sequence[str]: ...

    @property
    def servers_reused(self) -> int:
        """Client connections served on a kept server connection (no new backend)."""
        ...

    def stop_accepting(self) -> None: ...


def optional_adapters(cfg: Config) -> dict[str, RecipeAdapter]:
    """Recipe kinds whose adapters live in their own packages, imported only when present."""
    try:
        module = importlib.import_module("taidon_proxy.prepare.liquibase")
    except ModuleNotFoundError:
        return {}
    adapter: RecipeAdapter = module.LiquibaseAdapter(cfg)
    return {"lb": adapter}


class Lifecycle:
    """The current config (a reload replaces it), draining, and the request to stop."""

    def __init__(
        self,
        config: Config,
        builder: StateBuilder,
        instances: InstanceManager,
        virtual: VirtualDatabases,
        evictor: Evictor,
        listener: Listener,
        audit: Audit,
        *,
        started_at: float | None = None,
        stop_requested: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.started_at = time.time() if started_at is None else started_at
        self.draining = False
        # Set by a signal or by a drain; `sqlrs serve` closes the proxy when it is.
        self.stop_requested = asyncio.Event() if stop_requested is None else stop_requested
        self._builder = builder
        self._instances = instances
        self._virtual = virtual
        self._evictor = evictor
        self._listener = listener
        self._audit = audit
        self._reload_lock = asyncio.Lock()  # one reload at a time (SIGHUP and the API)

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def reload(self, *, actor: str) -> ConfigChange:
        """Read the config file again; apply it only if all of it is valid.

        Recipes, instance limits and lifetimes, cache limits and the Liquibase launcher take
        effect at once; sessions and running builds carry on with what they have. Keys bound
        at start (listen, admin, store, snapshot, runtime, relay, tls, auth) keep their
        running values and are reported as needing a restart. A bad file changes nothing:
        the ConfigError names each problem with file:line.
        """
        async with self._reload_lock:
            source = self.config.source
            if source is None:
                raise ConfigError("this proxy was not started from a config file")
            try:
                loaded = await asyncio.to_thread(load_config, source)
                change, cfg = diff(self.config, loaded)
                adapters = optional_adapters(cfg)  # checks Liquibase parameters: may refuse
                min_free_bytes(cfg.cache.min_free, 0)
            except ConfigError as e:
                # The problems' text stays out: a config line may quote a value.
                self._audit.record(
                    "reload", actor=actor, result="refused", problems=len(e.problems) or 1
                )
                raise
            self.config = cfg
            self._builder.config = cfg
            self._builder.adapters.update(adapters)
            self._builder.queue.kick()  # a raised build limit starts queued builds now
            self._instances.config = cfg
            self._virtual.config = cfg  # test_<alias> databases follow the recipes
            self._evictor.cfg = cfg.cache
            if any(k.startswith("cache.") for k in change.applied):
                self._evictor.request()
            self._audit.record(
                "reload", actor=actor, result="applied", added=change.added,
                removed=change.removed, changed=change.changed,
                needs_restart=[p.key for p in change.needs_restart],
            )  # fmt: skip
            log.info(
                "config.reloaded",
                source=str(source),
                added=change.added,
                removed=change.removed,
                changed=change.changed,
                applied=change.applied,
                needs_restart=[p.key for p in change.needs_restart],
            )
            return change

    async def drain(self, limit: float, *, actor: str) -> None:
        """Stop accepting, wait (bounded) for open sessions to end, then ask to stop."""
        listener = self._listener
        listener.stop_accepting()
        self.draining = True
        self._audit.record("drain", actor=actor, sessions=len(listener.sessions), timeout=limit)
        log.info("admin.drain", sessions=len(listener.sessions), limit=limit)
        deadline = time.monotonic() + limit
        # Polling: sessions end on their own schedule and the server keeps no "empty" event.
        while listener.sessions and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        log.info("admin.drained", left=len(listener.sessions))
        self.request_stop()
