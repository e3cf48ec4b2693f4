"""The state store: snapshot backend + metadata, kept consistent (snapshot first, row last)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from snapshots.base import NotFound, SnapshotBackend
from taidon_proxy.store.metadata import Metadata, StateRow

log = structlog.get_logger("taidon.store")


def new_clone_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


class StateStore:
    """States exist when both their snapshot and their metadata row exist."""

    def __init__(self, backend: SnapshotBackend, meta: Metadata, backend_name: str) -> None:
        self.backend = backend
        self.meta = meta
        self.backend_name = backend_name
        # Observer (metrics): (clone id prefix, seconds) after each clone.
        self.on_clone: Callable[[str, float], None] | None = None

    async def get(self, state_id: str) -> StateRow | None:
        return await self.meta.get_state(state_id)

    async def create_workspace(self) -> tuple[str, Path]:
        clone_id = new_clone_id("b")
        return clone_id, await self.backend.create(clone_id)

    async def clone(self, state_id: str, prefix: str) -> tuple[str, Path]:
        clone_id = new_clone_id(prefix)
        started = time.monotonic()
        path = await self.backend.clone(state_id, clone_id)
        if self.on_clone is not None:
            self.on_clone(prefix, time.monotonic() - started)
        return clone_id, path

    async def remove_clone(self, clone_id: str) -> None:
        await self.backend.remove_clone(clone_id)

    async def commit(self, clone_id: str, row: StateRow) -> StateRow:
        """Snapshot a clone as state `row.id`; the metadata row is written only after."""
        if row.backend != self.backend_name:
            raise ValueError("state recorded with another backend")
        await self.backend.snapshot(clone_id, row.id)
        try:
            size = await self.backend.disk_usage(row.id)
        except Exception:  # size is informative; never fail a build over it
            size = 0
        row = replace(row, size_bytes=size, created=time.time(), last_used=time.time())
        await self.meta.add_state(row)
        return row

    async def remove_state(self, state_id: str) -> None:
        await self.backend.remove_snapshot(state_id)
        await self.meta.remove_state(state_id)

    async def reconcile(self) -> dict[str, list[str]]:
        """After a restart: drop clones (instances never survive), orphan snapshots and rows."""
        await self.backend.recover()
        dropped_clones = await self.backend.list_clones()
        for c in dropped_clones:
            await self.backend.remove_clone(c)
        snaps = set(await self.backend.list_snapshots())
        rows = {r.id: r for r in await self.meta.states()}
        orphans = sorted(snaps - rows.keys())
        missing = sorted(rows.keys() - snaps)
        for sid in missing:  # a row whose snapshot is gone must never be served
            await self.meta.remove_state(sid)
        # Children first, so backends that chain layers can let go of parents.
        for sid in sorted(orphans, key=lambda s: s in rows, reverse=True):
            try:
                await self.backend.remove_snapshot(sid)
            except NotFound:
                pass
            except Exception as e:
                log.warning("store.orphan_kept", state=sid, error=str(e))
        if dropped_clones or orphans or missing:
            log.info(
                "store.reconciled",
                clones=len(dropped_clones),
                orphan_snapshots=len(orphans),
                missing_snapshots=len(missing),
            )
        return {"clones": dropped_clones, "orphans": orphans, "missing": missing}
