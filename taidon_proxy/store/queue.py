"""The build queue's rows in the store's metadata: what was waiting or running at a stop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from taidon_proxy.store.metadata_api import MetadataStore


class Queued(Protocol):
    """What a row is written from (prepare/queue.py's Entry)."""

    @property
    def job_id(self) -> str: ...
    @property
    def alias(self) -> str | None: ...
    @property
    def ref(self) -> str | None: ...
    @property
    def team(self) -> str | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def enqueued(self) -> float: ...


@dataclass(frozen=True)
class QueueRow:
    job_id: str
    alias: str | None
    ref: str | None
    team: str | None
    priority: int
    seq: int
    enqueued: float
    running: bool


class QueueRows:
    """Rows in the metadata's build-queue table (the `Durable` of prepare/queue.py)."""

    def __init__(self, meta: MetadataStore) -> None:
        self.table = meta.queue_table()

    async def add(self, e: Queued) -> None:
        await self.table.add(
            (e.job_id, e.alias, e.ref, e.team, int(e.priority), e.seq, e.enqueued, False)
        )

    async def started(self, job_id: str) -> None:
        await self.table.started(job_id)

    async def remove(self, job_id: str) -> None:
        await self.table.remove(job_id)

    async def pending(self) -> list[QueueRow]:
        """What an earlier proxy left, in order of arrival."""
        return [QueueRow(*r) for r in await self.table.pending()]

    async def reopen_job(self, job_id: str) -> None:
        """A resumed job is running again (the restart's reconcile had marked it cut off)."""
        await self.table.reopen_job(job_id)
