"""Client authentication for the proxy's own users: trust, SCRAM-SHA-256, cleartext over TLS.

With a token store (the team server), a user's personal access tokens are passwords too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from base64 import b64encode

from taidon_proxy.config import AuthConfig
from taidon_proxy.errors import AuthFailed, ConfigError
from taidon_proxy.pgwire import messages
from taidon_proxy.pgwire.saslprep import prepare_password
from taidon_proxy.pgwire.scram import (
    ScramServer,
    ScramVerifier,
    parse_sasl_initial_response,
    parse_verifier,
)
from taidon_proxy.store.tokens import TokenStore, parse


class Authenticator:
    """Answers the authentication exchange; secrets never leave this object."""

    def __init__(self, cfg: AuthConfig, tokens: TokenStore | None = None) -> None:
        self.method = cfg.method
        self.tokens = tokens
        self._users = dict(cfg.users)
        for user, verifier in self._users.items():
            try:
                parse_verifier(verifier)
            except Exception:
                raise ConfigError(
                    f"auth.users.{user}: not a SCRAM-SHA-256 verifier "
                    "(SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"
                ) from None
        self._mock_secret = secrets.token_bytes(16)

    def scram(self, user: str, tokens: list[str] | None = None) -> ScramServer:
        configured = self._users.get(user)
        verifiers = ([configured] if configured else []) + (tokens or [])
        return ScramServer(
            verifiers,
            nonce=b64encode(secrets.token_bytes(18)).decode(),
            user=user,
            mock_secret=self._mock_secret,
        )

    async def scram_for(self, user: str) -> ScramServer:
        """The exchange for a user: its configured verifier and its tokens' (those that share
        its salt: SCRAM offers the client one)."""
        if self.tokens is None:
            return self.scram(user)
        found = [v for _, v in await self.tokens.verifiers(user)]
        configured = self._users.get(user)
        if configured or found:
            head = parse_verifier(configured or found[0])
            found = [v for v in found if _same_salt(parse_verifier(v), head)]
        return self.scram(user, found)

    async def check_password(self, user: str, payload: bytes) -> None:
        """A cleartext password: one of the user's tokens, or its configured password."""
        password = payload.rstrip(b"\x00").decode("utf-8", errors="replace")
        if self.tokens is not None and parse(password) is not None:
            row = await self.tokens.check(password)
            if row is None or row.user != user:
                raise AuthFailed(f'password authentication failed for user "{user}"')
            return
        await asyncio.to_thread(self.check_cleartext, user, payload)

    @staticmethod
    def sasl_request() -> bytes:
        return messages.authentication_sasl(["SCRAM-SHA-256"])

    @staticmethod
    def parse_initial(payload: bytes) -> tuple[str, bytes]:
        return parse_sasl_initial_response(payload)

    def check_cleartext(self, user: str, payload: bytes) -> None:
        """Verify a PasswordMessage against the user's SCRAM verifier (constant-time)."""
        password = payload.rstrip(b"\x00").decode("utf-8", errors="replace")
        verifier = self._users.get(user)
        if verifier is None:
            raise AuthFailed(f'password authentication failed for user "{user}"')
        v = parse_verifier(verifier)
        salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), v.salt, v.iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise AuthFailed(f'password authentication failed for user "{user}"')


def _same_salt(v: ScramVerifier, head: ScramVerifier) -> bool:
    return v.salt == head.salt and v.iterations == head.iterations
