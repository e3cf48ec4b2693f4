"""Who may do what (the team server): principals, the permission table, and the one decision.

Every edge asks `require` (or `visible`) here: the admin API for each route, the network
shell for each connection. With no `teams:` in the config nothing here is consulted and the
proxy behaves as it did for one user.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from taidon_proxy.config import ROLES, Config, Role
from taidon_proxy.errors import TaidonError, UnknownDatabase

EVERY_ALIAS = "*"
ADMIN_USER = "admin"  # the principal of the store's admin token


class Permission(enum.StrEnum):
    SEE = "see"  # list and read aliases, states, instances, jobs, quotas
    CONNECT = "connect"  # open a Postgres connection to an alias
    BUILD = "build"  # prepare an alias's state
    RESET_OWN = "reset_own"  # reset or stop an instance the principal's own sessions use
    RESET = "reset"  # reset or stop any instance of an alias
    SNAPSHOT = "snapshot"  # a live instance as a named state
    PIN = "pin"  # pin or unpin a state
    REMOVE = "remove"  # remove a state
    ADMINISTER = "administer"  # everything else: drain, reload, cache, import, config, quotas


# The one table: the least role that holds each permission (each role includes those before).
MINIMUM_ROLE: dict[Permission, Role] = {
    Permission.SEE: "viewer",
    Permission.CONNECT: "developer",
    Permission.BUILD: "developer",
    Permission.RESET_OWN: "developer",
    Permission.RESET: "maintainer",
    Permission.SNAPSHOT: "maintainer",
    Permission.PIN: "maintainer",
    Permission.REMOVE: "maintainer",
    Permission.ADMINISTER: "admin",
}


def rank(role: Role) -> int:
    return ROLES.index(role)


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user, the teams they are in, their highest role, and per alias the
    role they hold there (`*`: every alias). Audit records name `user`."""

    user: str
    teams: tuple[str, ...]
    role: Role
    grants: tuple[tuple[str, Role], ...] = ()

    def role_for(self, alias: str | None) -> Role | None:
        """The role held on an alias (None: the alias is not the principal's to see); for no
        alias (a proxy-wide action), the highest role."""
        if alias is None:
            return self.role
        best: Role | None = None
        for scope, role in self.grants:
            if scope in (alias, EVERY_ALIAS) and (best is None or rank(role) > rank(best)):
                best = role
        return best

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


ADMIN = Principal(ADMIN_USER, (), "admin", ((EVERY_ALIAS, "admin"),))


def principal_for(cfg: Config, user: str, granted: tuple[str, ...] = ()) -> Principal | None:
    """The principal a user name stands for under the config in force (None: in no team).

    The one place principals come from, for a token, a password or a connection's user.
    `granted`: teams an OIDC login gave the user (its groups, mapped); those the config no
    longer has count for nothing.
    """
    teams: list[str] = []
    grants: list[tuple[str, Role]] = []
    for name, team in sorted(cfg.teams.items()):
        if user not in team.members and name not in granted:
            continue
        teams.append(name)
        # An admin team holds every alias; the others hold the aliases they list.
        scopes = [EVERY_ALIAS] if team.role == "admin" else team.aliases
        grants += [(scope, team.role) for scope in scopes]
    if not teams:
        return None
    role = max((cfg.teams[t].role for t in teams), key=rank)
    return Principal(user, tuple(teams), role, tuple(grants))


class Forbidden(TaidonError):
    """A principal lacks a permission: 403 on HTTP, 42501 on the wire; names what is missing."""

    sqlstate = "42501"

    def __init__(self, message: str, permission: Permission) -> None:
        super().__init__(message)
        self.permission = permission


def allowed(principal: Principal, permission: Permission, alias: str | None = None) -> bool:
    role = principal.role_for(alias)
    return role is not None and rank(role) >= rank(MINIMUM_ROLE[permission])


def visible_aliases(cfg: Config, principal: Principal) -> list[str]:
    return sorted(a for a in cfg.databases if principal.role_for(a) is not None)


def unknown_alias(cfg: Config, principal: Principal, alias: str) -> UnknownDatabase:
    """The answer for an alias that does not exist, and for one the principal may not see:
    the same words, listing only the aliases it may see."""
    known = ", ".join(visible_aliases(cfg, principal)) or "(none configured)"
    return UnknownDatabase(
        f'database "{alias}" does not exist',
        detail=f"known databases: {known}",
        hint="connect to one of the configured aliases, alias:label, or state:<id>;"
        " list them with: sqlrs ls aliases",
    )


def require(
    cfg: Config, principal: Principal, permission: Permission, alias: str | None = None
) -> None:
    """Refuse unless `principal` holds `permission` (on `alias`, when the action has one).

    An alias it cannot see is refused as an unknown one (UnknownDatabase), so nobody learns
    that it exists; one it sees with too small a role is Forbidden, naming the permission.
    """
    if alias is not None and (alias not in cfg.databases or principal.role_for(alias) is None):
        raise unknown_alias(cfg, principal, alias)
    if allowed(principal, permission, alias):
        return
    need = MINIMUM_ROLE[permission]
    has = principal.role_for(alias)
    where = f' on alias "{alias}"' if alias is not None else ""
    raise Forbidden(
        f"permission denied: {permission.value}{where} needs the {need} role"
        f" ({principal.user} has {has})",
        permission,
    )
