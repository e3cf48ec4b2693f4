"""Cache capacity: measure the store and evict unused leaf states, least valuable first.

Marks. The high-water mark is `cache.max_size` bytes of states (the sum of their recorded
sizes) or filesystem free space below `cache.min_free` (a size, or a percentage of the
filesystem). The low-water mark is LOW_WATER (90%) of max_size and, for free space,
min_free plus 10% of min_free. An automatic pass (`maybe_evict`: once each new state's
size is measured, on a disk-full error, at start, every CHECK_INTERVAL seconds) starts
only above the high-water mark; `gc()` (on demand) evicts whenever the store is above the
low-water mark. Both stop at the low-water mark or when nothing more may go. Sizes are
what the backend reports at commit: full copies for `copy`, a layer for `overlayfs`, and
exclusive bytes for `btrfs` (near zero), so on block-sharing backends min_free is the
limit that bites.

What may go: a leaf (no child state in metadata) that is not pinned, not named, not under
a live instance (nor an ancestor of one), not an `initdb` or `root` state, and not used in
the last `grace` seconds (a state just built or just resolved is about to be cloned).
initdb and root states are kept: they are the shared base of every rebuild, one per
engine and one per alias. When a state's last child goes, the parent becomes a leaf and
is judged like any other in the same pass.

Value score (the lowest goes first):

    value = (1 + build_seconds) * (1 + use_count) / ((1 + idle_hours) * (1 + size / 256 MiB))

so a state is worth keeping when it was slow to build, often used, recently used and small.
Ties go to the least recently used, then the id. Evicting removes the snapshot first, then
the row (with its names and fingerprints, so no fast path can hit a missing state); a
crash in between leaves a row without a snapshot, which reconcile removes at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from snapshots.base import InUse, NotFound, SnapshotError
from taidon_proxy.config import CacheConfig, parse_size
from taidon_proxy.errors import ConfigError
from taidon_proxy.store.metadata import StateRow
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.cache")

LOW_WATER = 0.9
FREE_HEADROOM = 0.1
SIZE_UNIT = 256 * 2**20
KEPT_KINDS = frozenset({"initdb", "root"})
DEFAULT_GRACE = 30.0
CHECK_INTERVAL = 60.0
RECENT_KEPT = 200


def min_free_bytes(spec: str, total_bytes: int) -> int:
    """`cache.min_free` as bytes: '10%' of the filesystem, or a size such as '2GiB'."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct < 100:
                raise ValueError(text)
            return int(total_bytes * pct / 100)
        return parse_size(text)
    except ValueError:
        raise ConfigError(
            f"cache.min_free: not a size or percentage: {spec!r} (use e.g. 10% or 5GiB)"
        ) from None


def value_score(row: StateRow, now: float) -> float:
    """How much keeping a state is worth (see the module docstring); higher stays longer."""
    idle_hours = max(0.0, now - row.last_used) / 3600
    return ((1 + row.build_seconds) * (1 + row.use_count)) / (
        (1 + idle_hours) * (1 + row.size_bytes / SIZE_UNIT)
    )


@dataclass(frozen=True)
class CacheUsage:
    used_bytes: int  # sum of the states' recorded sizes
    max_bytes: int
    free_bytes: int  # free space of the store's filesystem (for unprivileged use)
    total_bytes: int  # size of the store's filesystem
    min_free_bytes: int
    high_water_bytes: int
    low_water_bytes: int
    low_water_free_bytes: int
    state_count: int

    @property
    def above_high_water(self) -> bool:
        return self.used_bytes > self.high_water_bytes or self.free_bytes < self.min_free_bytes

    @property
    def above_low_water(self) -> bool:
        return self.used_bytes > self.low_water_bytes or self.free_bytes < self.low_water_free_bytes


@dataclass(frozen=True)
class EvictedState:
    id: str
    alias: str | None
    kind: str
    label: str
    size_bytes: int
    last_used: float
    use_count: int
    build_seconds: float
    value: float
    reason: str  # max_size | min_free
    at: float
    dry_run: bool


@dataclass
class EvictorStats:
    """Counters for metrics; they only grow (except the last_* fields)."""

    runs: int = 0
    evicted_states: int = 0
    evicted_bytes: int = 0
    busy_skipped: int = 0  # candidates the backend refused (a clone appeared meanwhile)
    errors: int = 0
    last_run_at: float | None = None
    last_run_seconds: float = 0.0
    recent: deque[EvictedState] = field(default_factory=lambda: deque(maxlen=RECENT_KEPT))


class Evictor:
    """Keeps the store under its capacity marks; one pass at a time."""

    def __init__(
        self,
        store: StateStore,
        cfg: CacheConfig,
        in_use: Callable[[], set[str]],
        *,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.in_use = in_use
        self.grace = grace
        self.stats = EvictorStats()
        # Subscribers (admin event streams) hear of every eviction as it happens.
        self.listeners: list[Callable[[EvictedState], None]] = []
        min_free_bytes(cfg.min_free, 0)  # a bad spec fails at start, not at the first pass
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task[None] | None = None
        self._again = False
        self._periodic: asyncio.Task[None] | None = None
        self._closed = False

    # --- measuring ----------------------------------------------------------------------------

    def _fs(self) -> tuple[int, int]:
        st = os.statvfs(self.store.backend.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    async def usage(self) -> CacheUsage:
        await self.store.settle()  # new states' sizes are measured in the background
        rows = await self.store.meta.states()
        free, total = await asyncio.to_thread(self._fs)
        return self._usage(sum(r.size_bytes for r in rows), len(rows), free, total)

    def _usage(self, used: int, count: int, free: int, total: int) -> CacheUsage:
        min_free = min_free_bytes(self.cfg.min_free, total)
        return CacheUsage(
            used_bytes=used,
            max_bytes=self.cfg.max_size,
            free_bytes=free,
            total_bytes=total,
            min_free_bytes=min_free,
            high_water_bytes=self.cfg.max_size,
            low_water_bytes=int(self.cfg.max_size * LOW_WATER),
            low_water_free_bytes=min_free + int(min_free * FREE_HEADROOM),
            state_count=count,
        )

    # --- evicting -----------------------------------------------------------------------------

    async def gc(self, *, dry_run: bool = False) -> list[EvictedState]:
        """Evict down to the low-water mark now (dry_run: only say what would go)."""
        async with self._lock:
            return await self._pass(start_above_low=True, dry_run=dry_run)

    async def maybe_evict(self) -> list[EvictedState]:
        """Evict down to the low-water mark if the store is above its high-water mark."""
        async with self._lock:
            return await self._pass(start_above_low=False, dry_run=False)

    def request(self) -> None:
        """Schedule `maybe_evict` in the background (coalesced); safe to call from any hook."""
        if self._closed:
            return
        if self._pending is not None and not self._pending.done():
            self._again = True
            return
        self._pending = asyncio.get_running_loop().create_task(
            self._background(), name="cache-evict"
        )

    async def _background(self) -> None:
        while True:
            self._again = False
            try:
                await self.maybe_evict()
            except Exception:
                self.stats.errors += 1
                log.exception("cache.evict_failed")
            if not self._again:
                return

    def start(self, interval: float = CHECK_INTERVAL) -> None:
        """Check periodically too: free space shrinks as instances write."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                self.request()

        self._periodic = asyncio.get_running_loop().create_task(loop(), name="cache-check")

    async def close(self) -> None:
        self._closed = True
        for task in (self._periodic, self._pending):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._periodic = self._pending = None

    def _protected(self, rows: dict[str, StateRow], names: set[str]) -> set[str]:
        keep = {sid for sid, r in rows.items() if r.pinned or r.kind in KEPT_KINDS}
        keep |= names
        # A live instance needs its state and, on layering backends, every ancestor.
        for used in self.in_use():
            sid: str | None = used
            while sid is not None and sid not in keep:
                keep.add(sid)
                row = rows.get(sid)
                sid = row.parent if row is not None else None
        return keep

    async def _pass(self, *, start_above_low: bool, dry_run: bool) -> list[EvictedState]:
        began = time.monotonic()
        await self.store.settle()
        rows = {r.id: r for r in await self.store.meta.states()}
        free, total = await asyncio.to_thread(self._fs)
        used = sum(r.size_bytes for r in rows.values())
        usage = self._usage(used, len(rows), free, total)
        if not (usage.above_low_water if start_above_low else usage.above_high_water):
            return []
        names = set((await self.store.meta.names()).values())
        keep = self._protected(rows, names)
        children: dict[str, int] = {}
        for r in rows.values():
            if r.parent is not None and r.parent in rows:
                children[r.parent] = children.get(r.parent, 0) + 1
        skipped: set[str] = set()
        evicted: list[EvictedState] = []
        log.info(
            "cache.pass", used=usage.used_bytes, max=usage.max_bytes, free=usage.free_bytes,
            min_free=usage.min_free_bytes, dry_run=dry_run, on_demand=start_above_low,
        )  # fmt: skip
        while usage.above_low_water:
            now = time.time()
            candidates = [
                r
                for sid, r in rows.items()
                if sid not in keep
                and sid not in skipped
                and children.get(sid, 0) == 0
                and now - r.last_used >= self.grace
            ]
            if not candidates:
                break
            victim = min(candidates, key=lambda r: (value_score(r, now), r.last_used, r.id))
            reason = "max_size" if usage.used_bytes > usage.low_water_bytes else "min_free"
            if not dry_run and not await self._remove(victim):
                skipped.add(victim.id)
                continue
            del rows[victim.id]
            if victim.parent in children:
                children[victim.parent] -= 1
            ev = EvictedState(
                id=victim.id, alias=victim.alias, kind=victim.kind, label=victim.label,
                size_bytes=victim.size_bytes, last_used=victim.last_used,
                use_count=victim.use_count, build_seconds=victim.build_seconds,
                value=value_score(victim, now), reason=reason, at=now, dry_run=dry_run,
            )  # fmt: skip
            evicted.append(ev)
            used -= victim.size_bytes
            if dry_run:
                free += victim.size_bytes  # an estimate: shared blocks may free less
            else:
                free, total = await asyncio.to_thread(self._fs)
                self.stats.evicted_states += 1
                self.stats.evicted_bytes += victim.size_bytes
                self.stats.recent.append(ev)
                for listener in list(self.listeners):
                    try:
                        listener(ev)
                    except Exception:
                        log.exception("cache.listener_failed")
            log.info(
                "cache.evicted" if not dry_run else "cache.would_evict",
                state=victim.id[:12], alias=victim.alias, label=victim.label,
                size=victim.size_bytes, value=round(ev.value, 4), reason=reason,
            )  # fmt: skip
            usage = self._usage(used, len(rows), free, total)
        if not dry_run:
            self.stats.runs += 1
            self.stats.last_run_at = time.time()
            self.stats.last_run_seconds = time.monotonic() - began
        if usage.above_high_water and not dry_run:
            log.warning(
                "cache.still_full", used=usage.used_bytes, free=usage.free_bytes,
                hint="everything left is pinned, named, in use or a base state",
            )  # fmt: skip
        return evicted

    async def _remove(self, row: StateRow) -> bool:
        """Remove one state; False when the backend still needs it (a clone appeared)."""
        try:
            await self.store.remove_state(row.id)
        except InUse:
            self.stats.busy_skipped += 1
            log.info("cache.evict_busy", state=row.id[:12])
            return False
        except NotFound:
            await self.store.meta.remove_state(row.id)
        except (SnapshotError, OSError) as e:
            self.stats.errors += 1
            log.warning("cache.evict_failed", state=row.id[:12], error=str(e))
            return False
        return True
