"""Which roles can log in to a state: declared by the recipe, or learned from an instance."""

from __future__ import annotations

from taidon_proxy.errors import TaidonError
from taidon_proxy.runtimes.base import InstanceHandle
from taidon_proxy.runtimes.connect import connect

SUPERUSER = "postgres"
ROLE_MISSING = "28000"  # invalid_authorization_specification: what Postgres says for it


class UnknownRole(TaidonError):
    sqlstate = ROLE_MISSING


class LoginRoles:
    """The login roles of states, learned the first time an instance refused a role.

    A recipe's `roles` (and postgres) exist in every state of it, but its own SQL may create
    more: so a role outside those is refused before anything is cloned only once an instance
    of that very state has said which roles it has.
    """

    def __init__(self) -> None:
        self._known: dict[str, frozenset[str]] = {}  # state id -> login roles

    @property
    def learned(self) -> bool:
        """Whether any state's roles are known (else no check can refuse: skip resolving)."""
        return bool(self._known)

    def check(self, state_id: str, user: str, declared: list[str]) -> None:
        if user == SUPERUSER or user in declared:
            return
        roles = self._known.get(state_id)
        if roles is not None and user not in roles:
            raise self.refusal(user, roles)

    @staticmethod
    def refusal(user: str, roles: frozenset[str]) -> UnknownRole:
        return UnknownRole(f'role "{user}" does not exist', hint=hint(roles))

    async def learn(self, state_id: str, handle: InstanceHandle, database: str) -> frozenset[str]:
        """Ask a running instance of the state for its login roles (as the superuser)."""
        conn = await connect(handle, database=database, user=SUPERUSER, timeout=10)
        try:
            rows = await conn.fetch("select rolname from pg_roles where rolcanlogin")
        finally:
            await conn.close()
        roles = frozenset(str(r["rolname"]) for r in rows)
        self._known[state_id] = roles
        return roles


def hint(roles: frozenset[str]) -> str:
    return "roles that can log in here: " + ", ".join(sorted(roles))
