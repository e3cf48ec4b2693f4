"""Instances and leases: shared per alias:label or one per connection, idle TTL, crash handling.

A shared instance is the user's database: its clone is recorded in the metadata and kept
when its server stops (idle TTL, a crash, a proxy stop or kill) until reset, rm or the
retention limit; the next connection starts a server on the same clone. Per-connection
instances (and warm spares) are throwaway: their clone goes with their server. A spare of
the shared pool (`instances.warm_labels`) becomes a shared instance when a new label takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from snapshots.base import NotFound
from taidon_proxy.config import Config
from taidon_proxy.errors import CapacityError, InstanceFailed, TaidonError, UnknownDatabase
from taidon_proxy.instances.keys import InstanceKey, Isolation
from taidon_proxy.instances.warmsizer import WarmSizer
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.prepare.jobs import JobEvent
from taidon_proxy.routing import Route
from taidon_proxy.runtimes.base import InstanceHandle, InstanceRuntime, RuntimeError_
from taidon_proxy.runtimes.connect import connect
from taidon_proxy.store.metadata import SharedRecord
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.instances")

# How long a handed-out spare's replacement waits before it starts.
REFILL_DELAY_S = 0.05
PRIME_TIMEOUT_S = 10.0
# How often kept clones are checked against instances.retention (at most; a short retention
# is checked four times per period).
RETENTION_CHECK_S = 60.0
# Shared instances are databases people keep: a commit is in the WAL (the OS page cache;
# fsync stays off) before it is acknowledged, so a server crash loses no committed work.
SHARED_SETTINGS = {"synchronous_commit": "on"}


class _StateGone(TaidonError):
    """The state's snapshot vanished (evicted) between resolving and cloning."""

    def __init__(self) -> None:
        super().__init__("state removed")


# Why a connection is being ended by the proxy: (sqlstate, message).
Terminate = Callable[[str, str], None]


@dataclass(eq=False)
class Instance:
    id: str
    key: InstanceKey
    alias: str | None
    label: str | None
    state_id: str
    isolation: Isolation
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
    record: SharedRecord | None = None  # shared instances: what keeps their clone
    path: str = ""  # the clone's directory (a shared record names it)

    @property
    def status(self) -> str:
        """running, stopping, or spare (a started, never used per-connection instance)."""
        if self.stopping:
            return "stopping"
        return "spare" if self.key.spare else "running"


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
        self._shared: dict[InstanceKey, Instance] = {}
        self._locks: dict[InstanceKey, asyncio.Lock] = {}
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Started, unused; by alias, state and the isolation they were started for.
        self._spares: dict[InstanceKey, list[Instance]] = {}
        self._filling: dict[InstanceKey, int] = {}
        # `instances.warm: auto`: per-connection pools sized from the connect rate.
        self._sizer = WarmSizer(config.instances.warm_max)
        self._reapers: dict[InstanceKey, asyncio.TimerHandle] = {}
        # Stopped shared instances by key: a clone and its record, no server.
        self.kept: dict[InstanceKey, SharedRecord] = {}
        # A start that the client who asked for it left: the next client waits for it.
        self._pending: dict[InstanceKey, asyncio.Future[Instance]] = {}
        self._retention_task: asyncio.Task[None] | None = None

    # --- acquiring --------------------------------------------------------------------------

    async def acquire(
        self, route: Route, progress: Callable[[JobEvent], None] | None = None
    ) -> Lease:
        if route.state_ref is not None:
            state_id, alias = await self._state_target(route.state_ref)
            isolation = Isolation(route.isolation or Isolation.SHARED)
            key = InstanceKey.exact(state_id, route.label, isolation)
        else:
            assert route.alias is not None
            self.builder.recipe(route.alias)
            alias, state_id = route.alias, None
            isolation = Isolation(route.isolation or self.config.databases[alias].isolation)
            key = InstanceKey.recipe(alias, route.label, isolation, route.ref)
        if isolation is Isolation.CONNECTION:
            inst = await self._resolve_and_create(
                key, alias=alias, state_id=state_id, ttl=route.ttl, progress=progress
            )
            return self._attach(inst)
        async with self._lock(key):
            existing = self._shared.get(key)
            pending = self._pending.get(key)
            if existing is not None and not existing.stopping:
                inst = existing
            elif pending is not None:
                inst = await asyncio.shield(pending)
            elif key in self.kept:
                inst = await self._shielded(key, self._restart(self.kept[key], route.ttl))
            else:
                inst = await self._resolve_and_create(
                    key, alias=alias, state_id=state_id, ttl=route.ttl, progress=progress
                )
            return self._attach(inst)

    def attach_running(self, route: Route) -> Lease | None:
        """A lease on the route's shared instance if its server runs now (nothing to wait
        for: the connect path of a client that connects per request), else None."""
        if route.state_ref is not None or route.alias not in self.config.databases:
            return None
        recipe = self.config.databases[route.alias]
        isolation = Isolation(route.isolation or recipe.isolation)
        if isolation is not Isolation.SHARED:
            return None
        key = InstanceKey.recipe(route.alias, route.label, isolation, route.ref)
        inst = self._shared.get(key)
        lock = self._locks.get(key)
        if inst is None or inst.stopping or (lock is not None and lock.locked()):
            return None
        return self._attach(inst)

    def _lock(self, key: InstanceKey) -> asyncio.Lock:
        """Serialises what changes one shared key: start, restart, idle stop, crash, reset."""
        return self._locks.setdefault(key, asyncio.Lock())

    async def _resolve_and_create(
        self, key: InstanceKey, *, alias: str | None, state_id: str | None, ttl: float | None,
        progress: Callable[[JobEvent], None] | None,
    ) -> Instance:  # fmt: skip
        """Resolve the recipe's state and start an instance on it; if the state was evicted
        between the two, resolve (and so rebuild) once more."""
        for attempt in (1, 2):
            sid = state_id or await self.builder.resolve(alias or "", progress, key.ref)
            isolation = key.isolation
            pooled = isolation is Isolation.CONNECTION or state_id is None  # not state:ID shared
            pooled = pooled and key.ref is None  # the pools hold the work tree's state only
            if pooled and isolation is Isolation.CONNECTION and self._auto_warm:
                self._arrived(InstanceKey.of_spare(alias, sid, isolation))
            if pooled and self._pool_size(isolation, InstanceKey.of_spare(alias, sid, isolation)):
                spare = self._take_spare(alias, sid, isolation)
                # Refill after this client's handshake: a server starting beside it would
                # take the CPU the handshake needs (two cores here).
                asyncio.get_running_loop().call_later(
                    REFILL_DELAY_S, self._refill, alias, sid, isolation
                )
                if spare is not None:
                    return await self._adopt(spare, key, ttl)
            try:
                return await self._shielded(
                    key if key.isolation is Isolation.SHARED else None,
                    self._create(key, alias=alias, state_id=sid, ttl=ttl),
                )
            except _StateGone:
                if state_id is not None or attempt == 2:
                    raise UnknownDatabase(f"state {sid[:12]} was removed") from None
                log.info("instance.state_gone", state=sid[:12], key=str(key))
        raise AssertionError("unreachable")

    # --- warm pools: started, never-used instances of a recipe's current state ---------------
    # instances.warm serves per-connection isolation; instances.warm_labels serves the first
    # connection of a new shared label (a test's own database, `shop:pytest-gw0-7`).

    def _pool_size(self, isolation: Isolation, key: InstanceKey) -> int:
        if isolation is not Isolation.CONNECTION:
            return self.config.instances.warm_labels
        warm = self.config.instances.warm
        if warm != "auto":
            return warm
        ceiling = self._sizer.ceiling = self.config.instances.warm_max
        have = len(self._spares.get(key, [])) + self._filling.get(key, 0)
        # Automatic spares never take the last `warm_max` slots of instances.max: clients'.
        free = self.config.instances.max - len(self.instances) - self._starting - ceiling
        return min(self._sizer.target(key, time.monotonic()), have + max(0, free))

    @property
    def _auto_warm(self) -> bool:
        return self.config.instances.warm == "auto"

    def _arrived(self, key: InstanceKey) -> None:
        self._sizer.arrived(key, time.monotonic())
        if key not in self._reapers:
            self._reapers[key] = asyncio.get_running_loop().call_later(
                self._sizer.window_s, self._reap, key
            )

    def _reap(self, key: InstanceKey) -> None:
        """An automatic pool whose stream stopped (no client in the window) lets its spares go."""
        del self._reapers[key]
        if not self._sizer.forget(key, time.monotonic()):
            self._reapers[key] = asyncio.get_running_loop().call_later(
                self._sizer.window_s, self._reap, key
            )
            return
        spares = self._spares.pop(key, [])
        if spares:
            log.info("instance.pool_idle", key=str(key), spares=len(spares))
        for spare in spares:
            self._spawn(self.destroy(spare, "warm pool idle"))

    def _take_spare(self, alias: str | None, sid: str, isolation: Isolation) -> Instance | None:
        want = InstanceKey.of_spare(alias, sid, isolation)
        stale_keys = [
            k for k in self._spares if k.alias == alias and k.isolation == isolation and k != want
        ]
        for key in stale_keys:
            for stale in self._spares.pop(key):  # the recipe moved on to another state
                self._spawn(self.destroy(stale, "stale spare"))
        pool = self._spares.get(want, [])
        while pool:
            inst = pool.pop()
            if not inst.stopping:
                return inst
        return None

    async def _adopt(self, spare: Instance, key: InstanceKey, ttl: float | None) -> Instance:
        """A spare becomes the instance of `key`; a shared one gets its record (its clone is
        then kept like any shared instance's)."""
        if spare.isolation is Isolation.SHARED:
            now = time.time()
            record = SharedRecord(
                key=str(key), alias=spare.alias, label=key.label or "default", state_ref=None,
                state_id=spare.state_id, clone_id=spare.clone_id, path=spare.path,
                created=now, last_used=now, status="running",
            )  # fmt: skip
            try:
                await self.store.meta.put_shared(record)
            except BaseException:
                await self.destroy(spare, "record failed")
                raise
            spare.record, spare.label = record, record.label
            spare.ttl = self._ttl(spare.alias, ttl)
            self._shared[key] = spare
        spare.key = key
        return spare

    def _refill(self, alias: str | None, sid: str, isolation: Isolation) -> None:
        key = InstanceKey.of_spare(alias, sid, isolation)
        have = len(self._spares.get(key, [])) + self._filling.get(key, 0)
        for _ in range(max(0, self._pool_size(isolation, key) - have)):
            self._filling[key] = self._filling.get(key, 0) + 1
            self._spawn(self._make_spare(alias, sid, isolation))

    async def _make_spare(self, alias: str | None, sid: str, isolation: Isolation) -> None:
        key = InstanceKey.of_spare(alias, sid, isolation)
        started = time.monotonic()
        try:
            inst = await self._create(key, alias=alias, state_id=sid, ttl=None)
        except TaidonError as e:  # a full pool is an optimisation; clients still get instances
            log.info("instance.spare_failed", key=str(key), error=e.message)
            return
        finally:
            self._filling[key] -= 1
        await self._prime(inst)
        self._sizer.started(key, time.monotonic() - started)
        self._spares.setdefault(key, []).append(inst)

    @staticmethod
    async def _prime(inst: Instance) -> None:
        """Connect once, so the spare's first client does not pay what a fresh server's first
        backend pays (rebuilding the relcache init files, reading the catalogs in)."""
        h = inst.handle
        try:
            conn = await connect(h, database=inst.database, timeout=PRIME_TIMEOUT_S)
            await conn.close()
        except (OSError, asyncpg.PostgresError, TimeoutError) as e:
            log.info("instance.prime_failed", instance=inst.id, error=str(e))

    async def _shielded(
        self, key: InstanceKey | None, start: Coroutine[Any, Any, Instance]
    ) -> Instance:
        """Start an instance even if the waiting client goes away; then let it expire normally.
        A shared key's abandoned start is what the next client of that key waits for."""
        task = asyncio.ensure_future(start)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._orphaned)
            if key is not None:
                self._pending[key] = task
                task.add_done_callback(lambda t: self._pending.pop(key, None))
            raise

    def _orphaned(self, task: asyncio.Future[Instance]) -> None:
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

    def database_for(self, alias: str | None) -> str:
        if alias is not None and alias in self.config.databases:
            return self.config.database_of(alias)
        return alias or "postgres"

    async def _create(
        self, key: InstanceKey, *, alias: str | None, state_id: str, ttl: float | None
    ) -> Instance:
        isolation = key.isolation
        label = key.label if isolation is Isolation.SHARED else None
        """A clone of the state with a server on it; a shared one (not a spare) is recorded."""
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
            settings = self._settings(alias, isolation)
            handle = await self.runtime.start(clone_id, path / "pgdata", settings)
            record = None
            if isolation is Isolation.SHARED and not key.spare:
                now = time.time()
                state_ref = state_id if key.is_state else None
                record = SharedRecord(
                    key=str(key), alias=alias, label=label or "default", state_ref=state_ref,
                    state_id=state_id, clone_id=clone_id, path=str(path), created=now,
                    last_used=now, status="running",
                )  # fmt: skip
                try:
                    await self.store.meta.put_shared(record)
                except BaseException:
                    await self.runtime.stop(handle, mode="immediate")
                    raise
        except Exception as e:
            if isinstance(e, TaidonError) and not isinstance(e, RuntimeError_):
                if clone_id is not None:
                    await self.store.remove_clone(clone_id)
                raise
            if clone_id is not None:
                with contextlib.suppress(Exception):
                    await self.store.remove_clone(clone_id)
            log.exception("instance.start_failed", key=str(key))
            raise InstanceFailed(f"could not start an instance: {e}") from e
        finally:
            self._starting -= 1
        await self.store.meta.touch_state(state_id)
        inst = Instance(
            id=clone_id, key=key, alias=alias, label=label, state_id=state_id,
            isolation=isolation, database=self.database_for(alias), clone_id=clone_id,
            handle=handle, ttl=self._ttl(alias, ttl), record=record, path=str(path),
        )  # fmt: skip
        self._register(inst)
        log.info("instance.started", instance=inst.id, key=str(key), state=state_id[:12])
        return inst

    def _ttl(self, alias: str | None, asked: float | None) -> float:
        if asked is not None:
            return asked
        recipe = self.config.databases.get(alias) if alias is not None else None
        if recipe is not None and recipe.idle_ttl is not None:
            return recipe.idle_ttl
        return self.config.instances.idle_ttl

    def _settings(self, alias: str | None, isolation: Isolation) -> dict[str, str]:
        settings = dict(self.instance_settings)
        if isolation is Isolation.SHARED:
            settings.update(SHARED_SETTINGS)
        if alias in self.config.databases:
            settings.update(self.config.databases[alias].settings)
        return settings

    def _register(self, inst: Instance) -> None:
        self.instances[inst.id] = inst
        if inst.isolation is Isolation.SHARED and inst.record is not None:  # not a spare
            self._shared[inst.key] = inst
        inst.watcher = asyncio.create_task(self._watch(inst), name=f"watch-{inst.id}")

    async def _restart(self, rec: SharedRecord, ttl: float | None) -> Instance:
        """Start a server on a kept clone (a clean data directory after an idle stop; crash
        recovery after a crash or a killed proxy). The clone stays kept if it fails."""
        if len(self.instances) + self._starting >= self.config.instances.max:
            raise CapacityError(
                f"too many instances ({self.config.instances.max})",
                hint="raise instances.max or reset idle shared instances",
            )
        self._starting += 1
        try:
            pgdata = Path(rec.path) / "pgdata"
            handle = await self.runtime.start(
                rec.clone_id, pgdata, self._settings(rec.alias, Isolation.SHARED)
            )
        except Exception as e:
            log.exception("instance.restart_failed", key=rec.key, instance=rec.clone_id)
            raise InstanceFailed(
                f"could not start the kept instance {rec.key}: {e}",
                hint=f"sqlrs admin reset {rec.key} gives it a fresh clone",
            ) from e
        finally:
            self._starting -= 1
        rec = replace(rec, status="running", last_used=time.time())
        try:
            await self.store.meta.put_shared(rec)
        except BaseException:
            await self.runtime.stop(handle, mode="immediate")
            raise
        key = InstanceKey.parse(rec.key)
        self.kept.pop(key, None)
        inst = Instance(
            id=rec.clone_id, key=key, alias=rec.alias, label=rec.label, state_id=rec.state_id,
            isolation=Isolation.SHARED, database=self.database_for(rec.alias),
            clone_id=rec.clone_id, handle=handle, ttl=self._ttl(rec.alias, ttl),
            created=rec.created, record=rec, path=rec.path,
        )  # fmt: skip
        self._register(inst)
        log.info("instance.restarted", instance=inst.id, key=rec.key, state=rec.state_id[:12])
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
        if inst.isolation is Isolation.CONNECTION:
            self._spawn(self.destroy(inst, "connection closed"))
        else:
            loop = asyncio.get_running_loop()
            inst.idle_timer = loop.call_later(inst.ttl, lambda: self._spawn(self._expire(inst)))

    async def _expire(self, inst: Instance) -> None:
        """Idle TTL: stop the server cleanly (fast: no recovery at the next start), keep the
        clone and its record (stopped); the next connection starts a server on it."""
        async with self._lock(inst.key):
            if not inst.leases and not inst.stopping:
                await self.destroy(inst, "idle ttl", keep_clone=True, mode="fast")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def destroy(
        self, inst: Instance, reason: str, *, sqlstate: str = "57P01", message: str | None = None,
        keep_clone: bool = False, mode: str = "immediate",
    ) -> None:  # fmt: skip
        """Stop an instance; its clients get an ErrorResponse with `message` first.

        keep_clone: a shared instance's clone and record stay (status stopped), so the next
        connection starts a server on the same data; otherwise both go.
        """
        if inst.stopping:
            return
        keep = keep_clone and inst.record is not None
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
            await self.runtime.stop(inst.handle, mode=mode)
        except Exception:
            log.exception("instance.stop_failed", instance=inst.id)
        if inst.watcher is not None and inst.watcher is not asyncio.current_task():
            inst.watcher.cancel()
        self.instances.pop(inst.id, None)
        if keep and inst.record is not None:
            rec = replace(inst.record, status="stopped", last_used=inst.last_active)
            self.kept[inst.key] = rec
            try:
                await self.store.meta.put_shared(rec)
            except Exception:  # the clone stays owned by the row written at start
                log.exception("instance.record_failed", instance=inst.id)
            log.info(
                "instance.stopped", instance=inst.id, key=str(inst.key), reason=reason, kept=True
            )
            return
        try:
            await self.store.remove_clone(inst.clone_id)
        except Exception:
            log.exception("instance.clone_remove_failed", instance=inst.id)
        if inst.record is not None:
            await self._forget(inst.record)
        log.info("instance.stopped", instance=inst.id, key=str(inst.key), reason=reason)

    async def _forget(self, rec: SharedRecord) -> None:
        try:
            await self.store.meta.remove_shared(rec.key, rec.clone_id)
        except Exception:  # an unowned clone is dropped at the next start anyway
            log.exception("instance.record_failed", key=rec.key)
        key = InstanceKey.parse(rec.key)
        if self.kept.get(key) is rec:
            del self.kept[key]

    async def drop_kept(self, rec: SharedRecord, reason: str) -> None:
        """Remove a stopped shared instance's clone and record (reset, rm, retention); the
        caller holds the key's lock."""
        if self.kept.get(InstanceKey.parse(rec.key)) is not rec:
            return
        try:
            await self.store.remove_clone(rec.clone_id)
        except Exception:
            log.exception("instance.clone_remove_failed", instance=rec.clone_id)
        await self._forget(rec)
        log.info("instance.removed", instance=rec.clone_id, key=rec.key, reason=reason)

    async def remove(
        self, target: Instance | SharedRecord, reason: str, *, message: str | None = None
    ) -> None:
        """Stop a running instance or drop a kept one; either way its clone goes. Its clients
        get 57P01 with `message` (default: the administrator command one)."""
        if isinstance(target, Instance) and target.record is None:
            await self.destroy(target, reason, message=message)  # not shared: no key to lock
            return
        key = target.key if isinstance(target, Instance) else InstanceKey.parse(target.key)
        async with self._lock(key):
            if isinstance(target, Instance):
                await self.destroy(target, reason, message=message)
            else:
                await self.drop_kept(target, reason)

    async def _watch(self, inst: Instance) -> None:
        status = await self.runtime.wait_exit(inst.handle)
        if inst.stopping:
            return
        log.warning("instance.crashed", instance=inst.id, key=str(inst.key), status=status)
        # A shared instance keeps its clone: the next start runs crash recovery on it.
        async with contextlib.AsyncExitStack() as stack:
            if inst.record is not None:
                await stack.enter_async_context(self._lock(inst.key))
            await self.destroy(
                inst,
                "crashed",
                sqlstate="57P02",
                message=f"the instance for {inst.key} stopped unexpectedly (exit status {status})",
                keep_clone=True,
            )

    async def reset(self, key: InstanceKey) -> bool:
        """Throw a shared instance's clone away (running or kept); False if there is none."""
        async with self._lock(key):
            inst = self._shared.get(key)
            if inst is not None and not inst.stopping:
                await self.destroy(inst, "reset")
                return True
            rec = self.kept.get(key)
            if rec is None:
                return False
            await self.drop_kept(rec, "reset")
            return True

    # --- kept clones across restarts, retention ---------------------------------------------

    async def owned_clones(self) -> set[str]:
        """Clones that shared instances' records own (reconcile keeps them)."""
        return {r.clone_id for r in await self.store.meta.shared_instances()}

    async def restore(self, clones: set[str]) -> None:
        """At start, after reconcile: every record whose clone exists is a stopped instance
        (its server, if an earlier proxy left one, was reaped); the others are forgotten."""
        for rec in await self.store.meta.shared_instances():
            if rec.clone_id not in clones:
                log.warning("instance.kept_clone_missing", key=rec.key, instance=rec.clone_id)
                await self.store.meta.remove_shared(rec.key, rec.clone_id)
                continue
            stopped = replace(rec, status="stopped")
            if rec.status != "stopped":
                await self.store.meta.put_shared(stopped)
            self.kept[InstanceKey.parse(rec.key)] = stopped
        if self.kept:
            log.info("instance.kept_clones", count=len(self.kept))

    @property
    def retention(self) -> float:
        """Seconds a stopped shared clone is kept after its last use (0: forever)."""
        return self.config.instances.retention

    def expires_at(self, rec: SharedRecord) -> float | None:
        return rec.last_used + self.retention if self.retention else None

    async def enforce_retention(self, now: float | None = None) -> list[str]:
        """Drop stopped shared clones unused for longer than the retention; their keys."""
        if not self.retention:
            return []
        dropped = []
        for key in list(self.kept):
            async with self._lock(key):
                rec = self.kept.get(key)
                at = self.expires_at(rec) if rec is not None else None
                if rec is not None and at is not None and (now or time.time()) >= at:
                    await self.drop_kept(rec, "retention")
                    dropped.append(str(key))
        return dropped

    def start(self) -> None:
        """Check the retention periodically (it is checked at start by the caller)."""

        async def loop() -> None:
            while True:  # the retention is read each time: a config reload may change it
                await asyncio.sleep(min(RETENTION_CHECK_S, max(0.5, self.retention / 4 or 60)))
                try:
                    await self.enforce_retention()
                except Exception:
                    log.exception("instance.retention_failed")

        self._retention_task = asyncio.create_task(loop(), name="instance-retention")

    def states_in_use(self) -> set[str]:
        """States under running instances and kept clones (eviction must keep them)."""
        used = {i.state_id for i in self.instances.values()}
        return used | {r.state_id for r in self.kept.values()}

    def shared(self, key: InstanceKey) -> Instance | SharedRecord | None:
        """The shared instance of a key: running (and not stopping), else kept, else None."""
        inst = self._shared.get(key)
        if inst is not None and not inst.stopping:
            return inst
        return self.kept.get(key)

    def listing(self) -> list[Instance | SharedRecord]:
        """Running instances, then stopped shared ones."""
        return [*self.instances.values(), *self.kept.values()]

    async def close(self) -> None:
        """Per-connection instances go; shared ones stop cleanly and keep their clones."""
        if self._retention_task is not None:
            self._retention_task.cancel()
        for timer in self._reapers.values():
            timer.cancel()
        self._reapers.clear()
        insts = list(self.instances.values())
        await asyncio.gather(
            *(self.destroy(i, "shutdown", sqlstate="57P01", message="the proxy is shutting down",
                           keep_clone=True, mode="fast" if i.record else "immediate")
              for i in insts),
            return_exceptions=True,
        )  # fmt: skip
        # Idle stops already under way finish (bounded by the runtime's stop timeout).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.config.instances.start_timeout)
        for t in list(self._tasks):
            t.cancel()
