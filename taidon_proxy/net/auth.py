"""Client authentication for the proxy's own users: trust, SCRAM-SHA-256, cleartext over TLS."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from base64 import b64encode

from taidon_proxy.config import AuthConfig
from taidon_proxy.errors import AuthFailed, ConfigError
from taidon_proxy.pgwire import messages
from taidon_proxy.pgwire.saslprep import prepare_password
from taidon_proxy.pgwire.scram import ScramServer, parse_sasl_initial_response, parse_verifier


class Authenticator:
    """Answers the authentication exchange; secrets never leave this object."""

    def __init__(self, cfg: AuthConfig) -> None:
        self.method = cfg.method
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

    def scram(self, user: str) -> ScramServer:
        return ScramServer(
            self._users.get(user),
            nonce=b64encode(secrets.token_bytes(18)).decode(),
            user=user,
            mock_secret=self._mock_secret,
        )

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
