"""Quotas of the team server: instances at once, per user and per team, counted as sessions
take them and let go. A check and its reservation happen in one step of the event loop (no
await between them), so of many clients racing for the last slot exactly one gets it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from taidon_proxy.config import Config
from taidon_proxy.errors import CapacityError
from taidon_proxy.services.access import Principal, rank


class QuotaExceeded(CapacityError):
    """A quota would be exceeded: names it, the current use and the limit (53300)."""

    sqlstate = "53300"


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


class QuotaLedger:
    """Which instances each user and team holds now (a key per instance, counted by session)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._users: dict[str, dict[str, int]] = {}
        self._teams: dict[str, dict[str, int]] = {}
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
                if self.on_refused is not None:
                    self.on_refused(team, "instances")
                raise QuotaExceeded(
                    f"quota exceeded: instances for {who}: {len(held)} in use, limit {limit}",
                    hint="close a connection (or reset an instance) first; sqlrs admin quotas"
                    " shows use against limits",
                )
        for _, held, _ in checks:
            held[key] = held.get(key, 0) + 1
        return Slot(principal.user, team, key)

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

        def entry(held: dict[str, int], limit: int | None) -> dict[str, Any]:
            return {"instances": {"used": len(held), "limit": limit}}

        def user_limit(user: str) -> int | None:
            found = cfg.users.get(user)
            return found.quotas.instances if found is not None else None

        builds, queued = self.builds_running(), self.builds_queued()

        def team_entry(t: str) -> dict[str, Any]:
            q = cfg.teams[t].quotas
            out = entry(self._teams.get(t, {}), q.instances)
            out["builds"] = {"used": builds.get(t, 0), "limit": q.builds}
            out["queued"] = {"used": queued.get(t, 0), "limit": q.queued}
            return out

        return {
            "users": {
                u: entry(
                    self._users.get(u, {}), q.quotas.instances if (q := cfg.users.get(u)) else None
                )
                for u in sorted(users)
            },
            "teams": {t: team_entry(t) for t in sorted(teams) if t in cfg.teams},
        }
