"""Prepare jobs: one build run with an ordered event log that clients can follow live."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobEvent:
    seq: int
    ts: float
    kind: str  # job.start | step.start | snapshot | log | progress | job.done | job.failed
    message: str


@dataclass
class Job:
    """A build in progress or done. Events are kept in memory and flushed to metadata."""

    alias: str | None
    team: str | None = None  # the team its build is counted against (the first asker's)
    id: str = field(default_factory=lambda: "j-" + secrets.token_hex(6))
    started: float = field(default_factory=time.time)
    status: str = "running"
    target: str | None = None
    error: str | None = None
    events: list[JobEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _flushed: int = 0

    def emit(self, kind: str, message: str) -> None:
        self.events.append(JobEvent(len(self.events), time.time(), kind, message))
        self._wake()

    def finish(self, status: str, *, target: str | None = None, error: str | None = None) -> None:
        self.status, self.target, self.error = status, target, error
        self.emit("job.done" if status == "succeeded" else "job.failed", error or target or "")

    def _wake(self) -> None:
        # Waiters hold the old event; a fresh one is armed for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.status != "running"

    async def follow(self, after: int = -1) -> AsyncIterator[JobEvent]:
        """Yield events with seq > after, live, until the job finishes."""
        nxt = after + 1
        while True:
            while nxt < len(self.events):
                yield self.events[nxt]
                nxt += 1
            if self.done:
                return
            await self._changed.wait()

    def mark_flushed(self) -> None:
        """The events so far are stored already (a job resumed after a restart)."""
        self._flushed = len(self.events)

    def unflushed(self) -> list[tuple[int, float, str, str]]:
        out = [(e.seq, e.ts, e.kind, e.message) for e in self.events[self._flushed :]]
        self._flushed = len(self.events)
        return out
