"""Quotas of the team server, per user and per team: instances at once, counted as sessions
take them and let go, and the disk their instances wrote (measured by `DiskWatch`). A check
and its reservation happen in one step of the event loop (no await between them), so of many
clients racing for the last slot exactly one gets it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from taidon_proxy.config import Config, Quotas
from taidon_proxy.errors import CapacityError
from taidon_proxy.services.access import Principal, rank

if TYPE_CHECKING:
    from taidon_proxy.instances.manager import Instance

log = structlog.get_logger("taidon.team")


class QuotaExceeded(CapacityError):
    """A quota would be exceeded: names it, the current use and the limit (53300)."""

    sqlstate = "53300"
    quota = "instances"

    def __init__(self, message: str, *, who: str, used: int, limit: int, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.who, self.used, self.limit = who, used, limit


class DiskQuotaExceeded(QuotaExceeded):
    """The disk a user's or team's instances wrote is past its limit: no new instance (53100)."""

    sqlstate = "53100"
    quota = "disk"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True, eq=False)
class Slot:
    """One session's hold on an instance, charged to a user and (maybe) a team."""

    user: str
    team: str | None
    key: str  # the instance's key (alias:label, or one per session for per-connection ones)


def charged_team(cfg: Config, principal: Principal, alias: str | None) -> str | None:
    """The team an instance of `alias` is counted against: of the principal's teams that hold
    the alias, the one with the highest role (then by name)."""
    best: tuple[int, str] | None = None
    for name in principal.teams:
        team = cfg.teams.get(name)
        if team is None:
            continue
        holds = team.role == "admin" or "*" in team.aliases or alias in team.aliases
        if holds and (best is None or (-rank(team.role), name) < best):
            best = (-rank(team.role), name)
    return best[1] if best else None


def seconds_limit(
    cfg: Config, slot: Slot, quota: Literal["lifetime", "idle_ttl"]
) -> tuple[float, str] | None:
    """A slot's limit in seconds (lifetime or idle TTL ceiling): its user's or its team's,
    the smaller, and whose quota that is."""
    limits: list[tuple[float, str]] = []
    user = cfg.users.get(slot.user)
    if user is not None and (seconds := getattr(user.quotas, quota)) is not None:
        limits.append((seconds, f'user "{slot.user}"'))
    team = cfg.teams.get(slot.team or "")
    if team is not None and (seconds := getattr(team.quotas, quota)) is not None:
        limits.append((seconds, f'team "{slot.team}"'))
    return min(limits) if limits else None


def cap_idle_ttl(cfg: Config, slot: Slot, inst: Instance) -> None:
    """An instance a session of `slot` uses stops after at most the idle TTL ceiling: a
    recipe's (or the proxy's) longer idle_ttl gets the ceiling. The smallest ceiling of the
    users that used it wins (an idle stop ends no session: the clone is kept)."""
    ceiling = seconds_limit(cfg, slot, "idle_ttl")
    if ceiling is not None and inst.ttl > ceiling[0]:
        log.info("team.idle_ttl_capped", instance=inst.id, ttl=inst.ttl, quota=ceiling[1],
                 ceiling=ceiling[0])  # fmt: skip
        inst.ttl = ceiling[0]


class QuotaLedger:
    """Which instances each user and team holds now (a key per instance, counted by session)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._users: dict[str, dict[str, int]] = {}
        self._teams: dict[str, dict[str, int]] = {}
        # Disk: who last used each instance (by id), what each wrote at the last measurement,
        # and the keys of the instances that exist then (a connection to one is no new one).
        self._owners: dict[str, tuple[str, str | None]] = {}
        self._written: dict[str, int] = {}
        self._existing: set[str] = set()
        self.measured_at: float | None = None
        self.refused: dict[str, int] = {}  # 'user "ana"' / 'team "payments"' -> refusals
        # Metrics: each refusal's team (None: a user's own quota, or no team) and quota name.
        self.on_refused: Callable[[str | None, str], None] | None = None
        # Builds running and waiting now per team (the build queue's), for the report.
        self.builds_running: Callable[[], Mapping[str, int]] = dict
        self.builds_queued: Callable[[], Mapping[str, int]] = dict

    def reserve(self, principal: Principal, alias: str | None, key: str) -> Slot:
        """Take a slot for an instance, or refuse with the quota, its use and its limit."""
        cfg = self._config()
        team = charged_team(cfg, principal, alias)
        user_cfg = cfg.users.get(principal.user)
        checks: list[tuple[str, dict[str, int], int | None]] = [
            (f'user "{principal.user}"', self._users.setdefault(principal.user, {}),
             user_cfg.quotas.instances if user_cfg is not None else None),
        ]  # fmt: skip
        if team is not None:
            limit = cfg.teams[team].quotas.instances
            checks.append((f'team "{team}"', self._teams.setdefault(team, {}), limit))
        for who, held, limit in checks:
            if limit is not None and key not in held and len(held) >= limit:
                self._refused(who, team, "instances")
                raise QuotaExceeded(
                    f"quota exceeded: instances for {who}: {len(held)} in use, limit {limit}",
                    who=who, used=len(held), limit=limit,
                    hint="close a connection (or reset an instance) first; sqlrs admin quotas"
                    " shows use against limits",
                )  # fmt: skip
        if key not in self._existing:
            self._check_disk(cfg, principal.user, team)
        for _, held, _ in checks:
            held[key] = held.get(key, 0) + 1
        return Slot(principal.user, team, key)

    def _refused(self, who: str, team: str | None, quota: str) -> None:
        self.refused[who] = self.refused.get(who, 0) + 1
        if self.on_refused is not None:
            self.on_refused(team, quota)

    def _check_disk(self, cfg: Config, user: str, team: str | None) -> None:
        """A new instance is refused while the disk its user's or team's instances wrote is
        past the limit (at the last measurement)."""
        user_cfg = cfg.users.get(user)
        checks = [(f'user "{user}"', self.disk_used(user=user),
                   user_cfg.quotas.disk if user_cfg is not None else None)]  # fmt: skip
        if team is not None:
            checks.append(
                (f'team "{team}"', self.disk_used(team=team), cfg.teams[team].quotas.disk)
            )
        for who, used, limit in checks:
            if limit is not None and used > limit:
                self._refused(who, team, "disk")
                raise DiskQuotaExceeded(
                    f"quota exceeded: disk written by the instances of {who}: {mib(used)} in"
                    f" use, limit {mib(limit)}",
                    who=who, used=used, limit=limit,
                    hint="reset or stop an instance of yours (sqlrs admin reset) to free what it"
                    " wrote; sqlrs admin quotas shows use against limits",
                )  # fmt: skip

    # --- disk -------------------------------------------------------------------------------

    def attach(self, slot: Slot, instance_id: str) -> None:
        """A session of `slot` now uses the instance: what it writes is charged to them."""
        self._owners[instance_id] = (slot.user, slot.team)

    def measured(self, written: dict[str, int], instances: dict[str, str], at: float) -> None:
        """A measurement: bytes each instance (by id) wrote; `instances`: the id and key of
        every instance that exists now (the owners of the others are forgotten)."""
        self._written = dict(written)
        self._existing = set(instances.values())
        self._owners = {i: o for i, o in self._owners.items() if i in instances}
        self.measured_at = at

    def disk_used(self, *, user: str | None = None, team: str | None = None) -> int:
        return sum(
            self._written.get(i, 0)
            for i, (u, t) in self._owners.items()
            if (user is not None and u == user) or (team is not None and t == team)
        )

    def release(self, slot: Slot) -> None:
        for table, name in ((self._users, slot.user), (self._teams, slot.team)):
            if name is None:
                continue
            held = table.get(name, {})
            left = held.get(slot.key, 0) - 1
            if left > 0:
                held[slot.key] = left
            else:
                held.pop(slot.key, None)

    def held_by_team(self) -> dict[str, int]:
        """Instances each team holds now (metrics)."""
        return {team: len(held) for team, held in self._teams.items()}

    def report(self, principal: Principal) -> dict[str, Any]:
        """Use against limits: every user and team for an admin, else its own (for teams
        also builds running against `quotas.builds`; more wait in the build queue)."""
        cfg = self._config()
        users = set(cfg.users) | set(self._users)
        teams = set(cfg.teams)
        if not principal.is_admin:
            users, teams = {principal.user}, set(principal.teams)

        def entry(who: str, held: dict[str, int], q: Quotas, used: int) -> dict[str, Any]:
            return {
                "instances": {"used": len(held), "limit": q.instances},
                "disk": {"used": used, "limit": q.disk},
                "lifetime": {"limit": q.lifetime},
                "idle_ttl": {"limit": q.idle_ttl},
                "refused": self.refused.get(who, 0),
            }

        def user_quotas(user: str) -> Quotas:
            found = cfg.users.get(user)
            return found.quotas if found is not None else Quotas()

        builds, queued = self.builds_running(), self.builds_queued()

        def team_entry(t: str) -> dict[str, Any]:
            q = cfg.teams[t].quotas
            out = entry(f'team "{t}"', self._teams.get(t, {}), q, self.disk_used(team=t))
            out["builds"] = {"used": builds.get(t, 0), "limit": q.builds}
            out["queued"] = {"used": queued.get(t, 0), "limit": q.queued}
            return out

        return {
            "users": {
                u: entry(
                    f'user "{u}"', self._users.get(u, {}), user_quotas(u), self.disk_used(user=u)
                )
                for u in sorted(users)
            },
            "teams": {t: team_entry(t) for t in sorted(teams) if t in cfg.teams},
            "disk_measured_at": self.measured_at,
        }
