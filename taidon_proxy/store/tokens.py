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
from taidon_proxy.store.metadata import Metadata

PREFIX = "tdn"
_TOKEN = re.compile(r"^tdn_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,          -- 12 hex digits, shown in listings
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,           -- SHA-256 (hex) of the whole token text
    verifier TEXT NOT NULL,       -- SCRAM-SHA-256 verifier of the token as a password
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked REAL                  -- when it was revoked (NULL: it was not)
);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(user);
CREATE TABLE IF NOT EXISTS token_salts (
    user TEXT PRIMARY KEY,
    salt BLOB NOT NULL,           -- every token of the user gets its verifier with this salt
    iterations INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS oidc_grants (
    user TEXT PRIMARY KEY,
    teams TEXT NOT NULL,          -- JSON list: the teams the user's groups mapped to
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,        -- the ID token's sub
    expires REAL NOT NULL         -- the last login's token expiry: the teams count until then
);
"""


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


_COLUMNS = "id, user, name, created, expires, revoked"


class TokenStore:
    """Tokens through the metadata's one SQLite thread."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        # user -> (teams, until when): read at open, so a connection's check needs no query
        self._grants: dict[str, tuple[tuple[str, ...], float]] = {}

    async def open(self) -> None:
        await self.meta.run(lambda: self.meta.db.executescript(SCHEMA))
        rows = await self.meta.run(
            lambda: self.meta.db.execute("SELECT user, teams, expires FROM oidc_grants").fetchall()
        )
        self._grants = {str(r[0]): (tuple(json.loads(r[1])), float(r[2])) for r in rows}

    def granted(self, user: str, now: float | None = None) -> tuple[str, ...]:
        """The teams the user's last OIDC login gave it, while that login's token lasts."""
        teams, until = self._grants.get(user, ((), 0.0))
        return teams if (time.time() if now is None else now) < until else ()

    async def grant(
        self, user: str, teams: tuple[str, ...], issuer: str, subject: str, expires: float
    ) -> None:
        """Record an OIDC login's teams for the user (they replace the previous login's)."""
        await self.meta.run(
            lambda: self.meta.db.execute(
                "INSERT OR REPLACE INTO oidc_grants VALUES (?, ?, ?, ?, ?)",
                (user, json.dumps(list(teams)), issuer, subject, expires),
            )
        )
        self._grants[user] = (teams, expires)

    async def salt(self, user: str) -> tuple[bytes, int]:
        """The user's token salt and iteration count, made at the first token."""

        def get() -> tuple[bytes, int]:
            db = self.meta.db
            db.execute(
                "INSERT OR IGNORE INTO token_salts VALUES (?, ?, ?)",
                (user, secrets.token_bytes(16), DEFAULT_ITERATIONS),
            )
            row = db.execute(
                "SELECT salt, iterations FROM token_salts WHERE user = ?", (user,)
            ).fetchone()
            return bytes(row[0]), int(row[1])

        return await self.meta.run(get)

    async def create(
        self, user: str, name: str, expires: float, salt: bytes, iterations: int
    ) -> NewToken:
        token_id = secrets.token_hex(6)
        token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
        verifier = make_verifier(token, salt=salt, iterations=iterations)
        row = TokenRow(token_id, user, name, time.time(), expires, None)
        await self.meta.run(
            lambda: self.meta.db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (row.id, user, name, _hash(token), verifier, row.created, expires),
            )
        )
        return NewToken(row, token)

    async def listing(self, user: str | None = None) -> list[TokenRow]:
        """Tokens (revoked and expired ones too), newest first; of one user, or of all."""
        where, args = ("WHERE user = ?", (user,)) if user is not None else ("", ())
        rows = await self.meta.run(
            lambda: self.meta.db.execute(
                f"SELECT {_COLUMNS} FROM tokens {where} ORDER BY created DESC", args
            ).fetchall()
        )
        return [TokenRow(*r) for r in rows]

    async def get(self, token_id: str) -> TokenRow | None:
        row = await self.meta.run(
            lambda: self.meta.db.execute(
                f"SELECT {_COLUMNS} FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
        )
        return TokenRow(*row) if row else None

    async def revoke(self, token_id: str) -> None:
        await self.meta.run(
            lambda: self.meta.db.execute(
                "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (time.time(), token_id),
            )
        )

    async def check(self, token: str) -> TokenRow | None:
        """The row of a valid token (well formed, known, hash equal, not revoked or expired)."""
        token_id = parse(token)
        if token_id is None:
            return None
        row = await self.meta.run(
            lambda: self.meta.db.execute(
                f"SELECT {_COLUMNS}, hash FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
        )
        if row is None or not hmac.compare_digest(str(row[6]), _hash(token)):
            return None
        found = TokenRow(*row[:6])
        return found if found.valid(time.time()) else None

    async def verifiers(self, user: str) -> list[tuple[str, str]]:
        """(id, SCRAM verifier) of the user's valid tokens."""
        rows = await self.meta.run(
            lambda: self.meta.db.execute(
                "SELECT id, verifier FROM tokens WHERE user = ? AND revoked IS NULL"
                " AND expires > ?",
                (user, time.time()),
            ).fetchall()
        )
        return [(str(r[0]), str(r[1])) for r in rows]
