"""Instances and leases: shared per alias:label or one per connection, idle TTL, crash handling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from snapshots.base import NotFound
from taidon_proxy.config import Config
from taidon_proxy.errors import CapacityError, InstanceFailed, TaidonError, UnknownDatabase
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.jobs import JobEvent
from taidon_proxy.routing import Route
from taidon_proxy.runtimes.base import InstanceHandle, InstanceRuntime
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.instances")

# How long a handed-out spare's replacement waits before it starts.
REFILL_DELAY_S = 0.05
PRIME_TIMEOUT_S = 10.0


class _StateGone(TaidonError):
    """The state's snapshot vanished (evicted) between resolving and cloning."""

    def __init__(self) -> None:
        super().__init__("state removed")


# Why a connection is being ended by the proxy: (sqlstate, message).
Terminate = Callable[[str, str], None]


@dataclass(eq=False)
class Instance:
    id: str
    key: str
    alias: str | None
    label: str | None
    state_id: str
    isolation: str
    database: str
    clone_id: str
    handle: InstanceHandle
    ttl: float
    created: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.time)
    leases: set[Lease] = field(default_factory=set)
    stopping: bool = False
    idle_timer: asyncio.TimerHandle | None = None
    watcher: asyncio.Task[None] | None = None


@dataclass(eq=False)
class Lease:
    instance: Instance
    on_terminate: Terminate | None = None
    released: bool = False


class InstanceManager:
    def __init__(
        self,
        config: Config,
        builder: StateBuilder,
        store: StateStore,
        runtime: InstanceRuntime,
        instance_settings: Mapping[str, str],
    ) -> None:
        self.config = config
        self.builder = builder
        self.store = store
        self.runtime = runtime
        self.instance_settings = dict(instance_settings)
        self.instances: dict[str, Instance] = {}  # by id
        self._shared: dict[str, Instance] = {}  # by key
        self._locks: dict[str, asyncio.Lock] = {}
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._spares: dict[str, list[Instance]] = {}  # "alias:state" -> started, unused
        self._filling: dict[str, int] = {}

    # --- acquiring --------------------------------------------------------------------------

    async def acquire(
        self, route: Route, progress: Callable[[JobEvent], None] | None = None
    ) -> Lease:
        if route.state_ref is not None:
            state_id, alias = await self._state_target(route.state_ref)
            key = f"state:{state_id}:{route.label}"
            isolation = route.isolation or "shared"
        else:
            assert route.alias is not None
            self.builder.recipe(route.alias)
            alias, state_id = route.alias, None
            key = f"{alias}:{route.label}"
            isolation = route.isolation or self.config.databases[alias].isolation
        if isolation == "connection":
            inst = await self._resolve_and_create(
                key, alias, None, state_id, "connection", route.ttl, progress
            )
            return self._attach(inst)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            existing = self._shared.get(key)
            if existing is not None and not existing.stopping:
                inst = existing
            else:
                inst = await self._resolve_and_create(
                    key, alias, route.label, state_id, "shared", route.ttl, progress
                )
            return self._attach(inst)

    async def _resolve_and_create(
        self, key: str, alias: str | None, label: str | None, state_id: str | None,
        isolation: str, ttl: float | None, progress: Callable[[JobEvent], None] | None,
    ) -> Instance:  # fmt: skip
        """Resolve the recipe's state and start an instance on it; if the state was evicted
        between the two, resolve (and so rebuild) once more."""
        for attempt in (1, 2):
            sid = state_id or await self.builder.resolve(alias or "", progress)
            if isolation == "connection" and self.config.instances.warm:
                spare = self._take_spare(alias, sid)
                # Refill after this client's handshake: a server starting beside it would
                # take the CPU the handshake needs (two cores here).
                asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._refill, alias, sid)
                if spare is not None:
                    spare.key = key
                    return spare
            try:
                return await self._create_shielded(key, alias, label, sid, isolation, ttl)
            except _StateGone:
                if state_id is not None or attempt == 2:
                    raise UnknownDatabase(f"state {sid[:12]} was removed") from None
                log.info("instance.state_gone", state=sid[:12], key=key)
        raise AssertionError("unreachable")

    # --- warm pool: started, never-used instances for per-connection isolation --------------

    def _take_spare(self, alias: str | None, sid: str) -> Instance | None:
        for key in [k for k in self._spares if k.startswith(f"{alias}:") and k != f"{alias}:{sid}"]:
            for stale in self._spares.pop(key):  # the recipe moved on to another state
                self._spawn(self.destroy(stale, "stale spare"))
        pool = self._spares.get(f"{alias}:{sid}", [])
        while pool:
            inst = pool.pop()
            if not inst.stopping:
                return inst
        return None

    def _refill(self, alias: str | None, sid: str) -> None:
        key = f"{alias}:{sid}"
        want = (
            self.config.instances.warm - len(self._spares.get(key, [])) - self._filling.get(key, 0)
        )
        for _ in range(max(0, want)):
            self._filling[key] = self._filling.get(key, 0) + 1
            self._spawn(self._make_spare(alias, sid))

    async def _make_spare(self, alias: str | None, sid: str) -> None:
        key = f"{alias}:{sid}"
        try:
            inst = await self._create(f"spare:{key}", alias, None, sid, "connection", None)
        except TaidonError as e:  # a full pool is an optimisation; clients still get instances
            log.info("instance.spare_failed", key=key, error=e.message)
            return
        finally:
            self._filling[key] -= 1
        await self._prime(inst)
        self._spares.setdefault(key, []).append(inst)

    @staticmethod
    async def _prime(inst: Instance) -> None:
        """Connect once, so the spare's first client does not pay what a fresh server's first
        backend pays (rebuilding the relcache init files, reading the catalogs in)."""
        h = inst.handle
        try:
            conn = await asyncpg.connect(
                host=str(h.socket_dir), port=h.port, user="postgres", database=inst.database,
                timeout=PRIME_TIMEOUT_S,
            )  # fmt: skip
            await conn.close()
        except (OSError, asyncpg.PostgresError, TimeoutError) as e:
            log.info("instance.prime_failed", instance=inst.id, error=str(e))

    async def _create_shielded(
        self, key: str, alias: str | None, label: str | None, sid: str, isolation: str,
        ttl: float | None,
    ) -> Instance:  # fmt: skip
        """Start an instance even if the waiting client goes away; then let it expire normally."""
        task = asyncio.ensure_future(self._create(key, alias, label, sid, isolation, ttl))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._orphaned)
            raise

    def _orphaned(self, task: asyncio.Task[Instance]) -> None:
        if not task.cancelled() and task.exception() is None and not task.result().leases:
            self._idle(task.result())

    async def _state_target(self, ref: str) -> tuple[str, str | None]:
        matches = await self.store.meta.resolve_state(ref)
        if not matches:
            raise UnknownDatabase(
                f'state "{ref}" does not exist', hint="list states with: sqlrs admin states"
            )
        if len(matches) > 1:
            raise TaidonError(
                f'state prefix "{ref}" is ambiguous',
                sqlstate="42P09",
                detail="candidates: " + ", ".join(m[:16] for m in matches),
            )
        row = await self.store.get(matches[0])
        assert row is not None
        return row.id, row.alias

    def _attach(self, inst: Instance) -> Lease:
        if inst.idle_timer is not None:
            inst.idle_timer.cancel()
            inst.idle_timer = None
        lease = Lease(inst)
        inst.leases.add(lease)
        inst.last_active = time.time()
        return lease

    def _database_for(self, alias: str | None) -> str:
        if alias is not None and alias in self.config.databases:
            return self.config.database_of(alias)
        return alias or "postgres"

    async def _create(
        self,
        key: str,
        alias: str | None,
        label: str | None,
        state_id: str,
        isolation: str,
        ttl: float | None,
    ) -> Instance:
        if len(self.instances) + self._starting >= self.config.instances.max:
            raise CapacityError(
                f"too many instances ({self.config.instances.max})",
                hint="raise instances.max or reset idle shared instances",
            )
        self._starting += 1
        clone_id = None
        try:
            try:
                clone_id, path = await self.store.clone(state_id, "i")
            except NotFound:
                raise _StateGone() from None
            settings = dict(self.instance_settings)
            if alias in self.config.databases:
                settings.update(self.config.databases[alias].settings)
            handle = await self.runtime.start(clone_id, path / "pgdata", settings)
        except TaidonError:
            if clone_id is not None:
                await self.store.remove_clone(clone_id)
            raise
        except Exception as e:
            if clone_id is not None:
                with contextlib.suppress(Exception):
                    await self.store.remove_clone(clone_id)
            log.exception("instance.start_failed", key=key)
            raise InstanceFailed(f"could not start an instance: {e}") from e
        finally:
            self._starting -= 1
        await self.store.meta.touch_state(state_id)
        recipe_ttl = (
            self.config.databases[alias].idle_ttl if alias in self.config.databases else None
        )
        inst = Instance(
            id=clone_id, key=key, alias=alias, label=label, state_id=state_id,
            isolation=isolation, database=self._database_for(alias), clone_id=clone_id,
            handle=handle, ttl=ttl if ttl is not None else (
                recipe_ttl if recipe_ttl is not None else self.config.instances.idle_ttl
            ),
        )  # fmt: skip
        self.instances[inst.id] = inst
        if isolation == "shared":
            self._shared[key] = inst
        inst.watcher = asyncio.create_task(self._watch(inst), name=f"watch-{inst.id}")
        log.info("instance.started", instance=inst.id, key=key, state=state_id[:12])
        return inst

    # --- releasing and stopping -------------------------------------------------------------

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        inst = lease.instance
        inst.leases.discard(lease)
        inst.last_active = time.time()
        if inst.leases or inst.stopping:
            return
        self._idle(inst)

    def _idle(self, inst: Instance) -> None:
        """No connections left: a per-connection instance goes now, a shared one after its TTL."""
        if inst.isolation == "connection":
            self._spawn(self.destroy(inst, "connection closed"))
        else:
            loop = asyncio.get_running_loop()
            inst.idle_timer = loop.call_later(inst.ttl, lambda: self._spawn(self._expire(inst)))

    async def _expire(self, inst: Instance) -> None:
        if not inst.leases and not inst.stopping:
            await self.destroy(inst, "idle ttl")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def destroy(
        self, inst: Instance, reason: str, *, sqlstate: str = "57P01", message: str | None = None
    ) -> None:
        """Stop an instance; its clients get an ErrorResponse with `message` first."""
        if inst.stopping:
            return
        inst.stopping = True
        if inst.idle_timer is not None:
            inst.idle_timer.cancel()
        if self._shared.get(inst.key) is inst:
            del self._shared[inst.key]
        for pool in self._spares.values():
            if inst in pool:
                pool.remove(inst)
        for lease in list(inst.leases):
            if lease.on_terminate is not None:
                lease.on_terminate(
                    sqlstate,
                    message or "terminating connection due to administrator command",
                )
        try:
            await self.runtime.stop(inst.handle, mode="immediate")
        except Exception:
            log.exception("instance.stop_failed", instance=inst.id)
        if inst.watcher is not None and inst.watcher is not asyncio.current_task():
            inst.watcher.cancel()
        try:
            await self.store.remove_clone(inst.clone_id)
        except Exception:
            log.exception("instance.clone_remove_failed", instance=inst.id)
        self.instances.pop(inst.id, None)
        log.info("instance.stopped", instance=inst.id, key=inst.key, reason=reason)

    async def _watch(self, inst: Instance) -> None:
        status = await self.runtime.wait_exit(inst.handle)
        if inst.stopping:
            return
        log.warning("instance.crashed", instance=inst.id, key=inst.key, status=status)
        await self.destroy(
            inst,
            "crashed",
            sqlstate="57P02",
            message=f"the instance for {inst.key} stopped unexpectedly (exit status {status})",
        )

    async def reset(self, alias: str, label: str) -> bool:
        inst = self._shared.get(f"{alias}:{label}")
        if inst is None:
            return False
        await self.destroy(inst, "reset")
        return True

    async def close(self) -> None:
        await asyncio.gather(
            *(self.destroy(i, "shutdown", sqlstate="57P01", message="the proxy is shutting down")
              for i in list(self.instances.values())),
            return_exceptions=True,
        )  # fmt: skip
        for t in list(self._tasks):
            t.cancel()
