"""Personal access tokens in the store's metadata: only hashes and SCRAM verifiers are kept.

A token reads `tdn_<id>_<secret>`: the id (12 hex digits) names it in listings, the secret
(32 random bytes) is shown once, at creation. The row keeps the SHA-256 of the whole token
(checked for a cleartext password or a bearer header) and a SCRAM-SHA-256 verifier derived
from it with the user's token salt (checked for SCRAM, where all of a user's tokens are tried
against one proof, so they share that salt).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from taidon_proxy.pgwire.scram import DEFAULT_ITERATIONS, make_verifier
from taidon_proxy.store.metadata_api import MetadataStore

PREFIX = "tdn"
_TOKEN = re.compile(r"^tdn_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class TokenRow:
    id: str
    user: str
    name: str
    created: float
    expires: float
    revoked: float | None

    def valid(self, now: float) -> bool:
        return self.revoked is None and now < self.expires


@dataclass(frozen=True)
class NewToken:
    row: TokenRow
    token: str  # the secret text: returned once, never stored


def parse(token: str) -> str | None:
    """The id of a well-formed token text, else None."""
    m = _TOKEN.match(token)
    return m.group(1) if m else None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


class TokenStore:
    """Tokens in the metadata's `tokens` table (SQLite in the store, or the shared Postgres)."""

    def __init__(self, meta: MetadataStore) -> None:
        self.meta = meta
        self.table = meta.token_table()
        # user -> (teams, until when): read at open, so a connection's check needs no query
        self._grants: dict[str, tuple[tuple[str, ...], float]] = {}

    async def open(self) -> None:
        await self.table.open()
        self._grants = {
            user: (tuple(json.loads(teams)), until)
            for user, teams, until in await self.table.grants()
        }

    def granted(self, user: str, now: float | None = None) -> tuple[str, ...]:
        """The teams the user's last OIDC login gave it, while that login's token lasts."""
        teams, until = self._grants.get(user, ((), 0.0))
        return teams if (time.time() if now is None else now) < until else ()

    async def grant(
        self, user: str, teams: tuple[str, ...], issuer: str, subject: str, expires: float
    ) -> None:
        """Record an OIDC login's teams for the user (they replace the previous login's)."""
        await self.table.put_grant(user, json.dumps(list(teams)), issuer, subject, expires)
        self._grants[user] = (teams, expires)

    async def salt(self, user: str) -> tuple[bytes, int]:
        """The user's token salt and iteration count, made at the first token."""
        return await self.table.salt(user, secrets.token_bytes(16), DEFAULT_ITERATIONS)

    async def create(
        self, user: str, name: str, expires: float, salt: bytes, iterations: int
    ) -> NewToken:
        token_id = secrets.token_hex(6)
        token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
        verifier = make_verifier(token, salt=salt, iterations=iterations)
        row = TokenRow(token_id, user, name, time.time(), expires, None)
        await self.table.insert(
            (row.id, user, name, row.created, expires, None), _hash(token), verifier
        )
        return NewToken(row, token)

    async def listing(self, user: str | None = None) -> list[TokenRow]:
        """Tokens (revoked and expired ones too), newest first; of one user, or of all."""
        return [TokenRow(*r) for r in await self.table.listing(user)]

    async def get(self, token_id: str) -> TokenRow | None:
        row = await self.table.get(token_id)
        return TokenRow(*row) if row else None

    async def revoke(self, token_id: str) -> None:
        await self.table.revoke(token_id, time.time())

    async def check(self, token: str) -> TokenRow | None:
        """The row of a valid token (well formed, known, hash equal, not revoked or expired)."""
        token_id = parse(token)
        if token_id is None:
            return None
        found = await self.table.with_hash(token_id)
        if found is None or not hmac.compare_digest(found[1], _hash(token)):
            return None
        row = TokenRow(*found[0])
        return row if row.valid(time.time()) else None

    async def verifiers(self, user: str) -> list[tuple[str, str]]:
        """(id, SCRAM verifier) of the user's valid tokens."""
        return await self.table.verifiers(user, time.time())
