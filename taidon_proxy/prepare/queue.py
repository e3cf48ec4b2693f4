"""The build queue: which build runs next (a sans-IO policy) and the asyncio gate builds wait at.

Builds run at most `builds.concurrency` at once, and a team's at most its
`teams.X.quotas.builds`. The next build is the waiting one with the best priority
(interactive connections, then prewarm / API prepares, then CI), then of the team running
the fewest builds now, then the oldest. A build a team cannot start yet waits; it is never
refused. Builds that ran when the proxy was killed go first after its restart.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from taidon_proxy.config import Config
from taidon_proxy.errors import CapacityError

NO_TEAM = "-"  # the label of builds asked for by no team (metrics, the API)
NOTICE_INTERVAL = 1.0  # at most one queue-position notice per build per second


class QueueFull(CapacityError):
    """A team's builds waiting at once would exceed `teams.X.quotas.queued` (53300)."""


class Priority(IntEnum):
    INTERACTIVE = 0  # a Postgres connection waits for it
    PREWARM = 1  # POST /v1/aliases/{alias}/prepare, sqlrs prepare, a resumed build
    CI = 2  # a prepare that says priority "ci"


PRIORITIES: Mapping[str, Priority] = {p.name.lower(): p for p in Priority}


def priority_of(value: int) -> Priority:
    """A stored priority (an unknown number, from a newer proxy say: prewarm)."""
    try:
        return Priority(value)
    except ValueError:
        return Priority.PREWARM


@dataclass(frozen=True)
class Requester:
    """Who asks for a build: the team it is counted against, and how urgent it is."""

    team: str | None = None
    priority: Priority = Priority.PREWARM


# Set by an edge (a Postgres session, an API prepare) around its call into the builder: a
# build it starts is queued for that team at that priority. A context variable, so the
# instance manager between them need not carry it.
ANYONE = Requester()  # frozen: safe as the default of every context
REQUESTER: contextvars.ContextVar[Requester] = contextvars.ContextVar(
    "taidon_build_requester", default=ANYONE
)


@dataclass
class Entry:
    """A build in the queue: waiting (running False) or holding a build slot."""

    job_id: str
    alias: str | None
    ref: str | None
    team: str | None
    priority: Priority
    seq: int  # order of arrival (kept across a restart)
    enqueued: float = field(default_factory=time.time)
    resumed: bool = False  # it was running when the proxy was killed: it goes first
    running: bool = False


# --- the policy (no IO: pure functions of the entries and the limits) -------------------------


def _key(e: Entry, running: Counter[str | None]) -> tuple[int, int, int, int]:
    return (0 if e.resumed else 1, int(e.priority), running[e.team], e.seq)


def order(entries: Iterable[Entry]) -> list[Entry]:
    """The waiting entries, next first."""
    entries = list(entries)
    running = Counter(e.team for e in entries if e.running)
    return sorted((e for e in entries if not e.running), key=lambda e: _key(e, running))


def pick(
    entries: Iterable[Entry], concurrency: int, team_limit: Callable[[str | None], int | None]
) -> list[Entry]:
    """Which waiting entries start now, in order: within the global and per-team limits."""
    entries = list(entries)
    running = Counter(e.team for e in entries if e.running)
    total = sum(running.values())
    waiting = [e for e in entries if not e.running]
    out: list[Entry] = []
    while waiting and total < concurrency:
        waiting.sort(key=lambda e: _key(e, running))
        nxt = next((e for e in waiting if _fits(e, running, team_limit)), None)
        if nxt is None:
            break
        waiting.remove(nxt)
        out.append(nxt)
        running[nxt.team] += 1
        total += 1
    return out


def _fits(
    e: Entry, running: Counter[str | None], team_limit: Callable[[str | None], int | None]
) -> bool:
    limit = team_limit(e.team)
    return limit is None or running[e.team] < limit


def positions(entries: Iterable[Entry]) -> dict[str, int]:
    """Each waiting build's number of waiting builds ahead of it."""
    return {e.job_id: i for i, e in enumerate(order(entries))}


def queued_message(ahead: int, waits_for: str) -> str:
    """The NOTICE a waiting client gets (and the job's `queued` event)."""
    builds = "build" if ahead == 1 else "builds"
    return f"queued: {ahead} {builds} ahead; {waits_for}"


# --- the asyncio shell --------------------------------------------------------------------


class Durable(Protocol):
    """Where the queue's rows live across a restart (store/queue.py)."""

    async def add(self, entry: Entry) -> None: ...
    async def started(self, job_id: str) -> None: ...
    async def remove(self, job_id: str) -> None: ...


@dataclass
class _Waiter:
    entry: Entry
    ready: asyncio.Future[None]
    on_position: Callable[[str], None] | None
    shown: str | None = None  # the last position message sent
    sent_at: float = 0.0
    timer: asyncio.TimerHandle | None = None


class BuildQueue:
    """Builds wait here for a slot; `kick` starts the ones the policy picks."""

    def __init__(self, config: Callable[[], Config], durable: Durable | None = None) -> None:
        self._config = config
        self.durable = durable
        self.entries: dict[str, Entry] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._seq = 0
        # Observers (metrics): a build's team and its seconds in the queue; a refusal's team
        # and quota.
        self.on_waited: Callable[[str | None, float], None] | None = None
        self.on_refused: Callable[[str | None, str], None] | None = None

    # --- limits -----------------------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        return self._config().builds.concurrency

    def team_limit(self, team: str | None) -> int | None:
        found = self._config().teams.get(team or "")
        return found.quotas.builds if found is not None else None

    def queued_limit(self, team: str | None) -> int | None:
        found = self._config().teams.get(team or "")
        return found.quotas.queued if found is not None else None

    def running_by_team(self) -> dict[str, int]:
        return dict(Counter(e.team or NO_TEAM for e in self.entries.values() if e.running))

    def queued_by_team(self) -> dict[str, int]:
        return dict(Counter(e.team or NO_TEAM for e in self.entries.values() if not e.running))

    # --- entries ----------------------------------------------------------------------------

    def enqueue(
        self, job_id: str, alias: str | None, ref: str | None, requester: Requester,
        *, seq: int | None = None, resumed: bool = False, enqueued: float | None = None,
    ) -> Entry:  # fmt: skip
        """Register a build (synchronously: arrival order is call order); `slot` runs it.
        Whoever enqueues must enter `slot` (or `discard` the entry): it counts until then."""
        if seq is None:
            seq = self._seq
        self._seq = max(self._seq, seq + 1)
        entry = Entry(
            job_id, alias, ref, requester.team, requester.priority, seq,
            enqueued if enqueued is not None else time.time(), resumed,
        )  # fmt: skip
        if not resumed:
            self._check_room(entry)
        self.entries[job_id] = entry
        self._waiters[job_id] = _Waiter(entry, asyncio.get_running_loop().create_future(), None)
        return entry

    def _check_room(self, entry: Entry) -> None:
        """Refuse a build that would wait while its team has `quotas.queued` waiting already
        (no await here: of many racing for the last place exactly the quota gets it)."""
        limit = self.queued_limit(entry.team)
        if limit is None:
            return
        entries = list(self.entries.values())
        starting = {id(e) for e in pick([*entries, entry], self.concurrency, self.team_limit)}
        if id(entry) in starting:
            return  # it starts at once: it does not wait
        waiting = sum(
            1 for e in entries if e.team == entry.team and not e.running and id(e) not in starting
        )
        if waiting >= limit:
            if self.on_refused is not None:
                self.on_refused(entry.team, "queued")
            raise QueueFull(
                f'quota exceeded: queued builds for team "{entry.team}": {waiting} waiting,'
                f" limit {limit}",
                hint="connect again once the team's builds are done; sqlrs admin jobs shows"
                " the queue (teams.X.quotas.queued raises the limit)",
            )

    def promote(self, job_id: str, priority: Priority) -> None:
        """A more urgent client joined a waiting build: it moves up to that priority."""
        entry = self.entries.get(job_id)
        if entry is not None and not entry.running and priority < entry.priority:
            entry.priority = priority
            self.kick()

    @asynccontextmanager
    async def slot(
        self, entry: Entry, on_position: Callable[[str], None] | None = None
    ) -> AsyncIterator[None]:
        """Wait for the entry's turn, hold a build slot for the block, then let the next go.

        Its row is kept while it waits and runs, and dropped when the block ends by itself
        (success or failure); a cancelled build (the proxy stopping) keeps it to resume.
        """
        waiter = self._waiters[entry.job_id]
        waiter.on_position = on_position
        started = time.monotonic()
        try:
            if self.durable is not None:
                await self.durable.add(entry)
            self.kick()
            await waiter.ready
        except BaseException:
            self.discard(entry.job_id)
            raise
        if self.on_waited is not None:
            self.on_waited(entry.team, time.monotonic() - started)
        ended_by_itself = False
        try:
            if self.durable is not None:
                await self.durable.started(entry.job_id)
            yield
            ended_by_itself = True
        except Exception:
            ended_by_itself = True
            raise
        finally:
            self.discard(entry.job_id)
            if ended_by_itself and self.durable is not None:
                await self.durable.remove(entry.job_id)

    def discard(self, job_id: str) -> None:
        """The build left the queue (done, failed, cancelled): the next may start."""
        self.entries.pop(job_id, None)
        waiter = self._waiters.pop(job_id, None)
        if waiter is None:
            return
        if waiter.timer is not None:
            waiter.timer.cancel()
        if not waiter.ready.done():
            waiter.ready.cancel()
        self.kick()

    def kick(self) -> None:
        """Start what may start now; tell waiting builds their new positions."""
        entries = list(self.entries.values())
        for entry in pick(entries, self.concurrency, self.team_limit):
            entry.running = True
            ready = self._waiters[entry.job_id].ready
            if not ready.done():
                ready.set_result(None)
        for job_id, ahead in positions(entries).items():
            self._show(self._waiters[job_id], ahead)

    def waits_for(self, entry: Entry) -> str:
        """What a waiting build waits for, in words."""
        limit = self.team_limit(entry.team)
        running = self.running_by_team()
        used = running.get(entry.team or NO_TEAM, 0)
        if limit is not None and used >= limit:
            return f'team "{entry.team}" runs {used} of its {limit} builds at once'
        total = sum(running.values())
        if total >= self.concurrency:
            return f"{total} of {self.concurrency} builds run at once"
        return "waiting for a build slot"

    def _show(self, waiter: _Waiter, ahead: int) -> None:
        if waiter.on_position is None:
            return
        text = queued_message(ahead, self.waits_for(waiter.entry))
        if text == waiter.shown:
            return
        now = time.monotonic()
        due = waiter.sent_at + NOTICE_INTERVAL
        if now >= due:
            waiter.shown, waiter.sent_at = text, now
            waiter.on_position(text)
        elif waiter.timer is None:  # the latest position goes out once the interval is over

            def later() -> None:
                waiter.timer = None
                if waiter.entry.job_id in self._waiters and not waiter.entry.running:
                    self._show(waiter, positions(self.entries.values()).get(waiter.entry.job_id, 0))

            waiter.timer = asyncio.get_running_loop().call_later(due - now, later)

    def view(self, job_id: str) -> dict[str, object] | None:
        """A build's place in the queue for the API (None: not queued or running)."""
        entry = self.entries.get(job_id)
        if entry is None:
            return None
        where = positions(self.entries.values())
        return {
            "state": "running" if entry.running else "queued",
            "position": where.get(job_id),
            "team": entry.team,
            "priority": entry.priority.name.lower(),
            "enqueued": entry.enqueued,
        }
