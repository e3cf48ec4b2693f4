"""The team server's use-cases: principals for a bearer or a connection, tokens, admission.

Built by `Proxy.open` always; `enabled` is false (and nothing here is consulted by the
edges) while the config in force has no `teams:`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from taidon_proxy.config import Config
from taidon_proxy.instances.manager import Instance
from taidon_proxy.pgwire.scram import parse_verifier
from taidon_proxy.services.access import (
    ADMIN,
    Forbidden,
    Permission,
    Principal,
    principal_for,
    require,
)
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.errors import Refusal, invalid
from taidon_proxy.services.quotas import QuotaExceeded, QuotaLedger, Slot, cap_idle_ttl
from taidon_proxy.store.tokens import NewToken, TokenRow, TokenStore, parse

DEFAULT_TOKEN_LIFETIME = 90 * 86400.0
MAX_TOKEN_LIFETIME = 366 * 86400.0


@dataclass(frozen=True)
class Admission:
    """A connection let in: who it is, and its hold on an instance (released at its close)."""

    principal: Principal
    slot: Slot


class Team:
    def __init__(
        self, config: Callable[[], Config], tokens: TokenStore, audit: Audit | None = None
    ) -> None:
        self._config = config
        self.tokens = tokens
        self.quotas = QuotaLedger(config)
        self.audit = audit  # quota refusals are recorded here

    @property
    def enabled(self) -> bool:
        return bool(self._config().teams)

    # --- principals -------------------------------------------------------------------------

    async def bearer(self, given: str, admin_token: str) -> Principal | None:
        """The principal of an admin-API bearer: the store's admin token is the admin; with
        teams, a valid personal token is its user. None: not a credential we know."""
        if hmac.compare_digest(given.encode(), admin_token.encode()):
            return ADMIN
        if not self.enabled or parse(given) is None:
            return None
        row = await self.tokens.check(given)
        if row is None:
            return None
        # A user since dropped from every team has no principal: its token no longer works.
        return self.principal_of(row.user)

    def principal_of(self, user: str) -> Principal | None:
        """The user's principal: its teams in the config and those its OIDC login gave it."""
        return principal_for(self._config(), user, self.tokens.granted(user))

    def connection(self, user: str) -> Principal:
        """The principal of an authenticated Postgres connection's user (42501: in no team)."""
        found = self.principal_of(user)
        if found is None:
            raise Forbidden(f'permission denied: user "{user}" is in no team', Permission.CONNECT)
        return found

    # --- connections ------------------------------------------------------------------------

    def admit(self, principal: Principal, alias: str | None, key: str) -> Admission:
        """Check CONNECT on the alias and take a quota slot for the instance `key`."""
        cfg = self._config()
        if alias is None:  # state:REF routes name no alias: maintainers of every alias only
            require(cfg, principal, Permission.ADMINISTER)
        else:
            require(cfg, principal, Permission.CONNECT, alias)
        try:
            return Admission(principal, self.quotas.reserve(principal, alias, key))
        except QuotaExceeded as e:
            if self.audit is not None:
                self.audit.record(
                    "quota_refusal", actor=principal.user, alias=alias, quota=e.quota,
                    of=e.who, used=e.used, limit=e.limit, sqlstate=e.sqlstate,
                )  # fmt: skip
            raise

    def attach(self, admission: Admission, inst: Instance) -> None:
        """The admitted session now uses `inst`: what the instance writes is charged to its
        user and team, and its idle TTL is held to their ceiling."""
        self.quotas.attach(admission.slot, inst.id)
        cap_idle_ttl(self._config(), admission.slot, inst)

    def leave(self, admission: Admission) -> None:
        self.quotas.release(admission.slot)

    # --- tokens -----------------------------------------------------------------------------

    def _owner(self, principal: Principal, user: str | None) -> str:
        """Whose tokens: one's own; another user's needs the admin role."""
        if not self.enabled:
            raise Refusal("unsupported", "tokens need teams: in the config (docs/team-server.md)")
        owner = user or principal.user
        if owner != principal.user:
            require(self._config(), principal, Permission.ADMINISTER)
        if self.principal_of(owner) is None:
            raise invalid("user", f'"{owner}" is in no team')
        return owner

    async def create_token(
        self, principal: Principal, name: str, lifetime: float | None, user: str | None = None
    ) -> NewToken:
        owner = self._owner(principal, user)
        seconds = DEFAULT_TOKEN_LIFETIME if lifetime is None else lifetime
        if not 0 < seconds <= MAX_TOKEN_LIFETIME:
            raise invalid("expires_in", f"must be more than 0 and at most {MAX_TOKEN_LIFETIME:g} s")
        return await self._mint(owner, name, seconds)

    async def login_token(
        self, user: str, teams: tuple[str, ...], issuer: str, subject: str, seconds: float
    ) -> tuple[NewToken, Principal]:
        """A token for a user an OIDC provider vouched for, with the teams its groups map to.

        The teams are recorded first: the new token is then valid exactly with them."""
        expires = time.time() + seconds
        await self.tokens.grant(user, teams, issuer, subject, expires)
        principal = self.principal_of(user)
        if principal is None:
            raise Forbidden(f'permission denied: user "{user}" is in no team', Permission.CONNECT)
        return await self._mint(user, "oidc-login", seconds), principal

    async def _mint(self, owner: str, name: str, seconds: float) -> NewToken:
        # SCRAM offers one salt per user: its configured password's, else its token salt.
        configured = self._config().auth.users.get(owner)
        if configured is not None:
            v = parse_verifier(configured)
            salt, iterations = v.salt, v.iterations
        else:
            salt, iterations = await self.tokens.salt(owner)
        return await self.tokens.create(owner, name, time.time() + seconds, salt, iterations)

    async def list_tokens(self, principal: Principal) -> list[TokenRow]:
        """One's own tokens; every user's for an admin."""
        return await self.tokens.listing(None if principal.is_admin else principal.user)

    async def revoke_token(self, principal: Principal, token_id: str) -> TokenRow:
        row = await self.tokens.get(token_id)
        # Another user's token answers as an unknown one unless the principal is an admin.
        if row is None or (row.user != principal.user and not principal.is_admin):
            raise Refusal("not_found", f'token "{token_id}" does not exist')
        await self.tokens.revoke(token_id)
        found = await self.tokens.get(token_id)
        assert found is not None
        return found
