"""The lifetime quota of the team server: an instance older than its users' limit is ended,
its clients told why (57P01). An instance is held to the most lenient limit of the sessions
on it, and to none while one of them has no limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog

from taidon_proxy.config import Config
from taidon_proxy.instances.manager import Instance, InstanceManager
from taidon_proxy.services.quotas import seconds_limit
from taidon_proxy.services.team import Admission
from taidon_proxy.services.watch import BackgroundLoop

log = structlog.get_logger("taidon.team")
CHECK_EVERY_S = 1.0

Holders = Callable[[], Iterable[tuple[Instance, Admission]]]


def limit_of(cfg: Config, admission: Admission) -> tuple[float, str] | None:
    """The lifetime a session's instance may reach: its user's or team's, the smaller."""
    return seconds_limit(cfg, admission.slot, "lifetime")


def expired(
    cfg: Config, holders: Iterable[tuple[Instance, Admission]], now: float
) -> list[tuple[Instance, float, str]]:
    """Instances past their limit: (instance, the limit, whose quota)."""
    per: dict[str, tuple[Instance, list[tuple[float, str] | None]]] = {}
    for inst, admission in holders:
        per.setdefault(inst.id, (inst, []))[1].append(limit_of(cfg, admission))
    out: list[tuple[Instance, float, str]] = []
    for inst, limits in per.values():
        if inst.stopping or not limits or any(lim is None for lim in limits):
            continue
        seconds, who = max(lim for lim in limits if lim is not None)
        if now - inst.created >= seconds:
            out.append((inst, seconds, who))
    return out


class LifetimeWatch(BackgroundLoop):
    """Checks every CHECK_EVERY_S while the config has a lifetime quota."""

    def __init__(
        self, config: Callable[[], Config], instances: InstanceManager, holders: Holders
    ) -> None:
        self._config = config
        self._instances = instances
        self._holders = holders

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            cfg = self._config()
            if not cfg.teams:
                continue
            for inst, seconds, who in expired(cfg, list(self._holders()), time.time()):
                message = (
                    f"terminating connection: the instance reached its maximum lifetime of"
                    f" {seconds:g}s (quota of {who})"
                )
                log.info("team.lifetime_ended", instance=inst.id, quota=who, seconds=seconds)
                await self._instances.remove(inst, "lifetime quota", message=message)
