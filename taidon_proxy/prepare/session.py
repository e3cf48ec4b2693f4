"""A work session: one writable clone with a server on it, committed to a state after each step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from snapshots.base import AlreadyExists
from taidon_proxy.prepare.jobs import Job
from taidon_proxy.runtimes.base import InstanceHandle, InstanceRuntime
from taidon_proxy.store.ids import step_state_id
from taidon_proxy.store.metadata import StateLink, StateRow
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.prepare")

_RELCACHE_INIT = "pg_internal.init"


class WorkSession:
    """Owns a build clone and its server; `commit` turns the current content into a state."""

    def __init__(
        self,
        store: StateStore,
        runtime: InstanceRuntime,
        clone_id: str,
        path: Path,
        *,
        state_id: str,
        alias: str | None,
        engine: str,
        settings: Mapping[str, str],
        job: Job,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.clone_id = clone_id
        self.path = path
        self.state_id = state_id  # the state the clone's content currently equals
        self.kept_id = state_id  # the last of them that is stored (`skip` stores none)
        self.alias = alias
        self.engine = engine
        self.settings = dict(settings)
        self.job = job
        self.handle: InstanceHandle | None = None
        self.unpublished: list[StateRow] = []  # snapshots taken with publish=False, in order
        self._step_started = time.monotonic()

    @property
    def pgdata(self) -> Path:
        return self.path / "pgdata"

    async def start(self) -> InstanceHandle:
        if self.handle is None:
            self.handle = await self.runtime.start(self.clone_id, self.pgdata, self.settings)
            self.store.building(True)
        return self.handle

    async def stop(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.store.building(False)
            await self.runtime.stop(handle, mode="fast")

    def begin_step(self) -> None:
        self._step_started = time.monotonic()

    async def commit(
        self, kind: str, step_hash: str, label: str, *, live: bool = False, publish: bool = True,
        provenance: Mapping[str, Any] | None = None,
    ) -> str:  # fmt: skip
        """Snapshot the clone as the child of the current state; return the new state id.

        live=False stops the server first (a clean state). live=True keeps it running (the
        caller holds its client after a commit, so the WAL is in the kernel; a CHECKPOINT first
        makes the state's crash recovery short) and marks the state unclean; the server is
        frozen for the snapshot unless the backend's snapshot is atomic, where a running
        server's files are crash-consistent as they are.
        publish=False takes the snapshot but holds its row back until `publish()`: until then
        it is no state, and `close()` drops it.
        """
        seconds = time.monotonic() - self._step_started
        # A fact even if this commit fails, so it goes first, before any server is frozen.
        state_id = await self._derive(kind, step_hash, label, provenance)
        if live and self.handle is not None and self.store.backend.capabilities.atomic_snapshot:
            await self._commit(state_id, kind, label, seconds, clean=False, publish=publish)
        elif live and self.handle is not None:
            await self.runtime.freeze(self.handle)
            try:
                await self._commit(state_id, kind, label, seconds, clean=False, publish=publish)
            finally:
                await self.runtime.thaw(self.handle)
        else:
            await self.stop()
            await asyncio.to_thread(drop_relcache_init_files, self.pgdata)
            await self._commit(state_id, kind, label, seconds, clean=True, publish=publish)
        self.state_id = state_id
        if publish:
            self.job.emit("snapshot", f"{label} -> {state_id[:12]}")
        self._step_started = time.monotonic()
        return state_id

    async def skip(
        self, kind: str, step_hash: str, label: str, provenance: Mapping[str, Any] | None = None
    ) -> str:
        """The step is done but not kept as a state (a build on a plain-copy store keeps every
        k-th): its id is derived and recorded as usual, so the chain stays the same and a
        later build finds the nearest kept state."""
        self.state_id = await self._derive(kind, step_hash, label, provenance)
        self.job.emit("progress", f"{label}: not kept (a state every few steps on this store)")
        self._step_started = time.monotonic()
        return self.state_id

    async def _derive(
        self, kind: str, step_hash: str, label: str, provenance: Mapping[str, Any] | None
    ) -> str:
        """The step's state id, with how it was derived (links: a bundle's manifest lists its
        chain) and what made it (docs/provenance.md; the first build's record is kept)."""
        state_id = step_state_id(self.state_id, kind, step_hash)
        await self.store.meta.add_links(
            [StateLink(state_id, self.state_id, kind, step_hash, label)]
        )
        if provenance is not None:
            await self.store.meta.add_provenance({state_id: dict(provenance)})
        return state_id

    async def _commit(
        self, state_id: str, kind: str, label: str, seconds: float, *, clean: bool, publish: bool
    ) -> None:
        now = time.time()
        row = StateRow(
            id=state_id, parent=self.kept_id, kind=kind, alias=self.alias, label=label,
            backend=self.store.backend_name, engine=self.engine, created=now, last_used=now,
            use_count=0, build_seconds=seconds, size_bytes=0, pinned=False, clean=clean,
        )  # fmt: skip
        try:
            row = await self.store.commit(self.clone_id, row, publish=publish)
        except AlreadyExists:
            # Already there: a concurrent build of another recipe made it (its snapshot comes
            # first, its row last: without the row, this is not a state yet).
            if await self.store.get(state_id) is None:
                raise
            self.kept_id = state_id
            return
        self.kept_id = state_id
        if not publish:
            self.unpublished.append(row)

    async def publish(self, before: Callable[[StateRow], None] | None = None) -> None:
        """Make the held-back snapshots states, parents first (`before` hears of each)."""
        while self.unpublished:
            row = self.unpublished[0]
            if before is not None:
                before(row)
            await self.store.publish(row)
            del self.unpublished[0]
            self.job.emit("snapshot", f"{row.label} -> {row.id[:12]}")

    async def close(self) -> None:
        try:
            await self.stop()
        finally:
            try:
                await self.store.remove_clone(self.clone_id)
            finally:
                await self._discard()

    async def _discard(self) -> None:
        """Drop snapshots whose rows were never published (the build failed before)."""
        rows, self.unpublished = self.unpublished, []
        for row in reversed(rows):
            try:
                await self.store.discard(row.id)
            except Exception as e:  # a restart drops it as an orphan snapshot
                log.warning("session.discard_failed", state=row.id, error=str(e))


def drop_relcache_init_files(pgdata: Path) -> None:
    """Postgres deletes its relcache init files at every start and the first backend writes
    them again: in a stopped server's state they are ~190 KB of new blocks per state that
    no clone will read."""
    for path in [pgdata / "global" / _RELCACHE_INIT, *pgdata.glob(f"base/*/{_RELCACHE_INIT}")]:
        path.unlink(missing_ok=True)
