"""The state store: snapshot backend + metadata, kept consistent (snapshot first, row last)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from snapshots.base import NotFound, SnapshotBackend, SnapshotError
from taidon_proxy.errors import CapacityError
from taidon_proxy.store.metadata import StateRow
from taidon_proxy.store.metadata_api import MetadataStore

log = structlog.get_logger("taidon.store")

# New states' sizes are measured when no build is running and no state was stored for
# MEASURE_QUIET seconds: a build stores states in quick succession (a Liquibase changelog, one
# every few ms) and a measurement (btrfs du walks every file, ~30 ms) would compete with it
# for two cores. A size waits at most MEASURE_MAX_DELAY; `settle` measures at once.
MEASURE_QUIET = 1.0
MEASURE_MAX_DELAY = 30.0


def new_clone_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def is_disk_full(exc: BaseException) -> bool:
    """Whether a backend failure (or anything it wraps) was ENOSPC/EDQUOT."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def store_full(what: str) -> CapacityError:
    return CapacityError(
        f"the state store is full: no space left to {what}",
        sqlstate="53100",
        hint="free disk space, lower cache.max_size / raise cache.min_free, or run sqlrs admin gc",
    )


class StateStore:
    """States exist when both their snapshot and their metadata row exist."""

    def __init__(self, backend: SnapshotBackend, meta: MetadataStore, backend_name: str) -> None:
        self.backend = backend
        self.meta = meta
        self.backend_name = backend_name
        # Called after a state is stored and when the disk is full (the evictor's trigger).
        self.on_capacity: Callable[[], None] | None = None
        # Observer (metrics): (clone id prefix, seconds) after each clone.
        self.on_clone: Callable[[str, float], None] | None = None
        self._unmeasured: dict[str, float] = {}  # state id -> when stored, in that order
        self._measurer: asyncio.Task[None] | None = None
        self._last_commit = 0.0
        self._builds = 0  # work sessions with a server running
        self._now = False  # settle(): measure without waiting
        self._wake = asyncio.Event()

    def _capacity(self) -> None:
        if self.on_capacity is not None:
            self.on_capacity()

    def _full(self, exc: BaseException, what: str) -> CapacityError | None:
        """The client-facing error for a full disk (None: not a full disk, re-raise as is)."""
        if not isinstance(exc, SnapshotError | OSError) or not is_disk_full(exc):
            return None
        log.warning("store.full", action=what, error=str(exc)[:400])
        self._capacity()
        return store_full(what)

    async def get(self, state_id: str) -> StateRow | None:
        return await self.meta.get_state(state_id)

    async def create_workspace(self) -> tuple[str, Path]:
        clone_id = new_clone_id("b")
        try:
            return clone_id, await self.backend.create(clone_id)
        except Exception as e:
            if (full := self._full(e, "make a workspace")) is None:
                raise
            raise full from e

    async def clone(self, state_id: str, prefix: str) -> tuple[str, Path]:
        clone_id = new_clone_id(prefix)
        started = time.monotonic()
        try:
            path = await self.backend.clone(state_id, clone_id)
        except Exception as e:
            if (full := self._full(e, "clone a state")) is None:
                raise
            raise full from e
        if self.on_clone is not None:
            self.on_clone(prefix, time.monotonic() - started)
        return clone_id, path

    async def remove_clone(self, clone_id: str) -> None:
        await self.backend.remove_clone(clone_id)

    async def commit(self, clone_id: str, row: StateRow, *, publish: bool = True) -> StateRow:
        """Snapshot a clone as state `row.id`; the metadata row is written only after.

        publish=False holds the row back: the snapshot is not a state until `publish(row)`
        (or it is dropped by `discard`; after a restart, as an orphan snapshot).
        """
        if row.backend != self.backend_name:
            raise ValueError("state recorded with another backend")
        try:
            await self.backend.snapshot(clone_id, row.id)
        except Exception as e:
            if (full := self._full(e, "store a new state")) is None:
                raise
            raise full from e
        row = replace(row, size_bytes=0, created=time.time(), last_used=time.time())
        if publish:
            await self.publish(row)
        return row

    async def publish(self, row: StateRow) -> None:
        """Write the row of a snapshot made by `commit(publish=False)`: now it is a state."""
        await self.meta.add_state(row)
        self._schedule_measure(row.id)

    async def discard(self, state_id: str) -> None:
        """Drop the snapshot of a row never published."""
        await self.backend.remove_snapshot(state_id)

    def building(self, running: bool) -> None:
        """A build's server started (True) or stopped (False): sizes wait while any runs."""
        self._builds += 1 if running else -1
        if not self._builds:
            self._wake.set()

    def _schedule_measure(self, state_id: str) -> None:
        """Measure the new state's size later, off the build's path; the capacity check follows."""
        self._last_commit = time.monotonic()
        self._unmeasured[state_id] = self._last_commit
        if self._measurer is None or self._measurer.done():
            self._measurer = asyncio.create_task(self._measure_pending(), name="store-measure")

    def _measure_delay(self) -> float:
        """Seconds until the next measurement may run (<= 0: now)."""
        if self._now:
            return 0.0
        now = time.monotonic()
        oldest = next(iter(self._unmeasured.values()))
        overdue = oldest + MEASURE_MAX_DELAY - now
        if self._builds:
            return overdue
        return min(overdue, self._last_commit + MEASURE_QUIET - now)

    async def _measure_pending(self) -> None:
        try:
            while self._unmeasured:
                while (wait := self._measure_delay()) > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                state_id = next(iter(self._unmeasured))
                await self._measure(state_id)
                self._unmeasured.pop(state_id, None)
                if not self._unmeasured:
                    self._capacity()
        finally:
            self._now = False

    async def _measure(self, state_id: str) -> None:
        try:
            size = await self.backend.disk_usage(state_id)
            await self.meta.set_size(state_id, size)
        except Exception as e:  # size is informative; never fail a build over it
            log.debug("store.size_unknown", state=state_id, error=str(e))

    async def settle(self) -> None:
        """Measure pending sizes now and wait for them (tests, gc, shutdown)."""
        while self._measurer is not None and not self._measurer.done():
            self._now = True
            self._wake.set()
            await asyncio.gather(self._measurer, return_exceptions=True)

    async def remove_state(self, state_id: str) -> None:
        self._unmeasured.pop(state_id, None)
        await self.backend.remove_snapshot(state_id)
        await self.meta.remove_state(state_id)

    async def list_clones(self) -> set[str]:
        return set(await self.backend.list_clones())

    async def reconcile(
        self, keep_clones: set[str] | frozenset[str] = frozenset()
    ) -> dict[str, list[str]]:
        """After a restart: drop clones nothing owns (a shared instance's record owns its
        clone: `keep_clones`), orphan snapshots, and rows without snapshots."""
        await self.backend.recover()
        dropped_clones = [c for c in await self.backend.list_clones() if c not in keep_clones]
        for c in dropped_clones:
            try:
                await self.backend.remove_clone(c)
            except Exception as e:  # keep serving; the next start tries again
                log.warning("store.clone_kept", clone=c, error=str(e))
        snaps = set(await self.backend.list_snapshots())
        rows = {r.id: r for r in await self.meta.states()}
        orphans = sorted(snaps - rows.keys())
        missing = sorted(rows.keys() - snaps)
        for sid in missing:  # a row whose snapshot is gone must never be served
            await self.meta.remove_state(sid)
        # Orphans may depend on each other (layers, origins): retry until nothing moves.
        left = list(orphans)
        for _ in range(len(orphans)):
            kept: list[str] = []
            for sid in left:
                try:
                    await self.backend.remove_snapshot(sid)
                except NotFound:
                    pass
                except Exception:
                    kept.append(sid)
            if len(kept) == len(left):
                break
            left = kept
        for sid in left:
            log.warning("store.orphan_kept", state=sid)
        cut = await self.meta.fail_running_jobs("interrupted: the proxy stopped during the build")
        if dropped_clones or orphans or missing or cut:
            log.info(
                "store.reconciled",
                clones=len(dropped_clones),
                orphan_snapshots=len(orphans),
                missing_snapshots=len(missing),
                interrupted_jobs=cut,
            )
        return {"clones": dropped_clones, "orphans": orphans, "missing": missing}
