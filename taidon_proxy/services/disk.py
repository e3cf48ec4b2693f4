"""The disk quota's measurement: what each instance's clone wrote, every DISK_EVERY_S.

An instance's written bytes are its clone's allocated bytes (as `du` counts them) less its
state's (the snapshot it was cloned from, measured once per state): what it grew by. Running
instances and kept (stopped) shared clones are measured alike; the ledger charges each to the
user and team that last used it. Only while the config has a `disk` quota.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from taidon_proxy.config import Config
from taidon_proxy.instances.manager import InstanceManager
from taidon_proxy.services.quotas import QuotaLedger
from taidon_proxy.services.watch import BackgroundLoop
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.team")
DISK_EVERY_S = 5.0


def allocated_bytes(root: Path) -> int:
    """Bytes allocated under `root` on its filesystem (hard links once). Files a running
    server removes meanwhile are skipped, not an error (`du` would fail on them)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        device = os.lstat(root).st_dev
    except FileNotFoundError:
        return 0
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:
                continue
            if st.st_dev != device or (st.st_ino, st.st_dev) in seen:
                continue
            seen.add((st.st_ino, st.st_dev))
            total += st.st_blocks * 512
    return total


async def du_bytes(path: Path) -> int:
    return await asyncio.to_thread(allocated_bytes, path)


def has_disk_quota(cfg: Config) -> bool:
    quotas = [t.quotas for t in cfg.teams.values()] + [u.quotas for u in cfg.users.values()]
    return any(q.disk is not None for q in quotas)


class DiskWatch(BackgroundLoop):
    def __init__(
        self,
        config: Callable[[], Config],
        instances: InstanceManager,
        store: StateStore,
        ledger: QuotaLedger,
    ) -> None:
        self._config = config
        self._instances = instances
        self._store = store
        self._ledger = ledger
        self._bases: dict[str, int] = {}  # state id -> its snapshot's bytes (immutable)

    def _clones(self) -> dict[str, tuple[str, str, str]]:
        """id -> (key, clone directory, state id) of every instance and kept clone now."""
        out = {
            i.id: (str(i.key), i.path, i.state_id)
            for i in self._instances.instances.values()
            if i.path and not i.key.spare
        }
        for rec in self._instances.kept.values():
            out[rec.clone_id] = (rec.key, rec.path, rec.state_id)
        return out

    async def _base(self, state_id: str) -> int:
        if state_id not in self._bases:
            path = await self._store.backend.snapshot_path(state_id)
            self._bases[state_id] = await du_bytes(path)
        return self._bases[state_id]

    async def measure(self) -> None:
        """Measure every clone once and hand the result to the ledger."""
        written: dict[str, int] = {}
        for inst_id, (_, path, state_id) in self._clones().items():
            try:
                grown = await du_bytes(Path(path)) - await self._base(state_id)
            except Exception as e:  # a clone removed meanwhile, a state evicted: next time
                log.debug("team.disk_unmeasured", instance=inst_id, error=str(e))
                continue
            written[inst_id] = max(0, grown)
        now = {i: key for i, (key, _, _) in self._clones().items()}
        self._ledger.measured(written, now, time.time())

    async def _run(self) -> None:
        while True:
            if self._config().teams and has_disk_quota(self._config()):
                try:
                    await self.measure()
                except Exception:
                    log.exception("team.disk_measure_failed")
            await asyncio.sleep(DISK_EVERY_S)
