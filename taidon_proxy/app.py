"""The proxy assembled from its config: store, backend, runtime, builder, instances, listener."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from pathlib import Path

import structlog

from snapshots.base import SnapshotBackend, SnapshotError
from snapshots.registry import detect, open_backend
from taidon_proxy.admin.metrics import Metrics
from taidon_proxy.admin.server import AdminServer
from taidon_proxy.config import Config
from taidon_proxy.config_diff import ConfigChange
from taidon_proxy.errors import ConfigError
from taidon_proxy.instances.manager import InstanceManager
from taidon_proxy.instances.virtual import VirtualDatabases
from taidon_proxy.net import offload
from taidon_proxy.net.auth import Authenticator
from taidon_proxy.net.maintenance import Maintenance
from taidon_proxy.net.server import ProxyServer, is_local
from taidon_proxy.net.tls import server_context
from taidon_proxy.prepare.alembic.adapter import AlembicAdapter
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.command import CommandAdapter
from taidon_proxy.prepare.context import RecipeAdapter
from taidon_proxy.prepare.django.adapter import DjangoAdapter
from taidon_proxy.prepare.psql import PsqlAdapter
from taidon_proxy.runtimes.base import InstanceRuntime
from taidon_proxy.runtimes.registry import open_runtime
from taidon_proxy.services import BackendInfo, Services
from taidon_proxy.services.audit import SIGNAL, Audit
from taidon_proxy.services.disk import DiskWatch
from taidon_proxy.services.lifecycle import Lifecycle, optional_adapters
from taidon_proxy.services.lifetime import LifetimeWatch
from taidon_proxy.services.oidc import OidcLogin, fetch_json
from taidon_proxy.services.recipes import Recipes
from taidon_proxy.services.team import Team
from taidon_proxy.store.audit import AuditLog
from taidon_proxy.store.eviction import Evictor
from taidon_proxy.store.metadata_choice import make_metadata
from taidon_proxy.store.states import StateStore
from taidon_proxy.store.tokens import TokenStore

log = structlog.get_logger("taidon.app")


def default_run_dir(store: Path) -> Path:
    """A short per-store directory for unix sockets (paths are limited to 107 bytes)."""
    tag = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"taidon-{os.getuid()}-{tag}"


def backend_settings(backend_name: str) -> dict[str, str]:
    """Server settings a snapshot backend needs (policy lives here, not in the backend)."""
    if backend_name == "overlayfs":
        # fsync of every file at crash recovery would copy the whole data dir up.
        return {"recovery_init_sync_method": "syncfs"}
    return {}


class Proxy:
    """Everything one `sqlrs serve` runs. Open with `await Proxy.open(cfg)`, then `start()`."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.started_at = time.time()
        self.meta = make_metadata(config.metadata, config.store)
        self.audit_log = AuditLog(self.meta, config.store / "audit.head")
        self.audit = Audit(self.audit_log)
        self.backend: SnapshotBackend | None = None
        self.backend_name = ""
        self.backend_reason = ""
        self.runtime: InstanceRuntime | None = None
        self.store: StateStore | None = None
        self.builder: StateBuilder | None = None
        self.instances: InstanceManager | None = None
        self.evictor: Evictor | None = None
        self.server: ProxyServer | None = None
        self.virtual: VirtualDatabases | None = None  # databases made by CREATE DATABASE
        self.admin: AdminServer | None = None
        self.lifetime: LifetimeWatch | None = None  # the team server's lifetime quota
        self.disk: DiskWatch | None = None  # the team server's disk quota measurement
        self.metrics = Metrics()
        # Set by a signal or by an admin drain; `sqlrs serve` closes the proxy when it is.
        self.stop_requested = asyncio.Event()
        self.services: Services | None = None  # set once open: what the edges are given

    @property
    def config(self) -> Config:
        """The config in force: the one opened with, until a reload replaces it."""
        return self.services.config if self.services is not None else self._config

    @classmethod
    async def open(cls, config: Config) -> Proxy:
        self = cls(config)
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        return self

    async def _open(self) -> None:
        cfg = self.config
        store = cfg.store
        store.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            store.chmod(0o755)  # the servers' unprivileged user must traverse it
        await self.meta.open()
        await self.audit_log.open()
        self.backend_name, self.backend_reason = await asyncio.to_thread(self._choose_backend)
        options = dict(cfg.snapshot.options)
        if cfg.snapshot.dataset:
            options["dataset"] = cfg.snapshot.dataset
        try:
            self.backend = await asyncio.to_thread(
                open_backend, self.backend_name, store / "data", options
            )
            # Where the backend put the states, when it has a choice (zfs: the dataset, or
            # a child of it mounted at <store>/data): said at start, and in the status.
            placement = getattr(self.backend, "placement", None)
            if placement is not None:
                self.backend_reason = f"{self.backend_reason}; {await placement()}"
        except SnapshotError as e:
            raise ConfigError(f"snapshot.backend {self.backend_name}: {e}") from e
        # Recorded only once it opened: a failed attempt must not bind the store to it.
        (store / "backend").write_text(self.backend_name + "\n")
        log.info("store.backend", backend=self.backend_name, reason=self.backend_reason)
        rt = cfg.runtime
        run_dir = rt.run_dir or default_run_dir(store)
        options_rt: dict[str, object] = {"run_dir": run_dir}
        if rt.kind == "process":
            options_rt.update(bin_dir=rt.postgres_bin, os_user=rt.os_user)
        else:
            if not rt.image:
                raise ConfigError("runtime.image is required for runtime.kind docker")
            options_rt.update(
                image=rt.image, store_label=str(store.resolve()), memory=rt.memory, cpus=rt.cpus
            )
        self.runtime = open_runtime(rt.kind, **options_rt)
        self.store = StateStore(self.backend, self.meta, self.backend_name)
        settings = backend_settings(self.backend_name)
        psql_bin = Path(await self._psql_bin())
        adapters: dict[str, RecipeAdapter] = {
            "psql": PsqlAdapter(psql_bin),
            "command": CommandAdapter(),
            "alembic": AlembicAdapter(),
            "django": DjangoAdapter(),
        }
        adapters.update(optional_adapters(cfg))
        self.builder = StateBuilder(cfg, self.store, self.runtime, adapters, settings)
        self.instances = InstanceManager(cfg, self.builder, self.store, self.runtime, settings)
        self.evictor = Evictor(self.store, cfg.cache, self._in_use)
        self.store.on_capacity = self.evictor.request
        tls = server_context(cfg.tls.cert, cfg.tls.key) if cfg.tls.cert and cfg.tls.key else None
        if not is_local(cfg.listen):
            # Off loopback, anyone who can reach the port gets a superuser session otherwise.
            if cfg.auth.method != "scram-sha-256":
                raise ConfigError(
                    f"listen: {cfg.listen} is not a loopback address; that needs "
                    "auth.method scram-sha-256 (and preferably tls)"
                )
            if tls is None:
                log.warning("proxy.no_tls", listen=cfg.listen, hint="configure tls.cert/key")
        if cfg.relay == "native" and not offload.available():
            raise ConfigError(
                "relay: native, but the C relay was not built (run scripts/setup; it needs gcc)"
            )
        native = cfg.relay != "python" and offload.available()
        log.info("proxy.relay", relay="native" if native else "python")
        tokens = TokenStore(self.meta)
        await tokens.open()
        team = Team(lambda: self.config, tokens, self.audit)
        self.server = ProxyServer(
            self.instances,
            Authenticator(cfg.auth, tokens),
            tls,
            audit=self.audit,
            native=native,
            team=team,
        )
        self.virtual = VirtualDatabases(
            cfg, self.instances, self.store, self.runtime, cfg.test_databases
        )
        self.server.maintenance = Maintenance(self.virtual, self.instances)
        server = self.server
        self.lifetime = LifetimeWatch(
            lambda: self.config,
            self.instances,
            lambda: [
                (s.lease.instance, s.admission)
                for s in list(server.sessions)
                if s.lease is not None and s.admission is not None
            ],
        )
        self.disk = DiskWatch(lambda: self.config, self.instances, self.store, team.quotas)
        lifecycle = Lifecycle(
            cfg, self.builder, self.instances, self.virtual, self.evictor, self.server, self.audit,
            started_at=self.started_at, stop_requested=self.stop_requested,
        )  # fmt: skip
        self.services = Services(
            lifecycle=lifecycle, meta=self.meta, store=self.store,
            backend=BackendInfo(self.backend_name, self.backend_reason), runtime=self.runtime,
            builder=self.builder, instances=self.instances, virtual=self.virtual,
            evictor=self.evictor, recipes=Recipes(self.builder), listener=self.server,
            audit=self.audit,
            team=team,
            oidc=OidcLogin(lambda: self.config, team, self.audit, fetch_json),
        )  # fmt: skip
        self._observe(self.services)

    def _observe(self, services: Services) -> None:
        """Feed the metrics from the services' hooks (they do not import the admin package)."""
        assert self.server and self.builder and self.store
        self.metrics.watch(services)
        self.server.on_session_opened = self.metrics.session_opened
        self.server.on_session_closed = self.metrics.session_closed
        self.builder.on_resolved = self.metrics.resolved
        self.builder.on_built = self.metrics.built
        self.builder.on_job_done = services.audit.build_done
        self.builder.on_team_built = self.metrics.team_built
        self.builder.queue.on_waited = self.metrics.queue_waited
        services.team.quotas.on_refused = self.metrics.quota_refused
        services.team.quotas.builds_running = self.builder.queue.running_by_team
        services.team.quotas.builds_queued = self.builder.queue.queued_by_team
        self.builder.queue.on_refused = self.metrics.quota_refused
        self.store.on_clone = self.metrics.cloned

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def reload(self, actor: str = SIGNAL) -> ConfigChange:
        """Read the config file again; apply it only if all of it is valid (see Lifecycle)."""
        if self.services is None:
            raise ConfigError("the proxy is not open")
        return await self.services.lifecycle.reload(actor=actor)

    def _choose_backend(self) -> tuple[str, str]:
        """The configured backend, never a different one than the store was made with."""
        marker = self.config.store / "backend"
        wanted = self.config.snapshot.backend
        recorded = marker.read_text().strip() if marker.exists() else None
        options = dict(self.config.snapshot.options)
        if self.config.snapshot.dataset:
            options["dataset"] = self.config.snapshot.dataset
        if wanted == "auto":
            if recorded:
                return recorded, f"the store was created with {recorded}"
            name, reason = detect(self.config.store / "data", options)
        else:
            if recorded and recorded != wanted:
                raise ConfigError(
                    f"snapshot.backend: the store {self.config.store} holds {recorded} snapshots;"
                    f" it cannot be opened as {wanted} (use a new store, or backend {recorded})"
                )
            name, reason = wanted, "configured"
        return name, reason

    def _in_use(self) -> set[str]:
        """States under live instances and kept shared clones (the evictor adds ancestors)."""
        if self.instances is None:
            return set()
        return self.instances.states_in_use()

    async def _psql_bin(self) -> str:
        rt = self.config.runtime
        if rt.postgres_bin is not None:
            return str(rt.postgres_bin / "psql")
        return shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"

    async def start(self) -> None:
        """Reap what an earlier proxy left, reconcile the store, then listen."""
        assert self.runtime and self.store and self.server and self.evictor and self.instances
        # No server survives a restart; shared instances' clones do (their records own them)
        # and get a server again on their next connection.
        reaped = await self.runtime.reap(set())
        if reaped:
            log.info("runtime.reaped", instances=len(reaped))
        await self.store.reconcile(keep_clones=await self.instances.owned_clones())
        await self.instances.restore(await self.store.list_clones())
        await self.instances.enforce_retention()
        assert self.builder is not None
        await self.builder.resume()  # builds queued (or running) at the last stop
        self.instances.start()
        if self.lifetime is not None:
            self.lifetime.start()
        if self.disk is not None:
            self.disk.start()
        await self.evictor.maybe_evict()
        self.evictor.start()
        await self.server.listen(self.config.listen)
        if self.config.admin.listen is not None:
            assert self.services is not None
            self.admin = AdminServer(self.services, self.metrics)
            await self.admin.start(self.config.admin.listen)

    async def close(self) -> None:
        if self.lifetime is not None:
            await self.lifetime.close()
        if self.disk is not None:
            await self.disk.close()
        if self.services is not None:
            self.services.lifecycle.draining = True  # GET /v1/ready answers 503 from now on
        if self.server is not None:
            # Sessions first (a grace period, then 57P01), then the instances under them;
            # the admin API answers meanwhile, so probes see the drain.
            await self.server.close(self.config.shutdown_grace)
        if self.admin is not None:
            await self.admin.close()
        if self.builder is not None:
            await self.builder.close()  # queued builds keep their rows: the next start resumes
        if self.virtual is not None:
            await self.virtual.close()
        if self.instances is not None:
            await self.instances.close()
        if self.evictor is not None:
            await self.evictor.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.store is not None:
            await self.store.settle()
        await self.audit_log.close()  # the last sessions' records are written before this
        if self.backend is not None:
            try:
                await self.backend.close()  # overlayfs: unmounts views and kept clones
            except SnapshotError as e:
                log.warning("store.close_failed", error=str(e))
        await self.meta.close()
