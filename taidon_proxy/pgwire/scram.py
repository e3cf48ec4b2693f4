"""SCRAM-SHA-256 server side (RFC 5802/7677) without channel binding, plus verifier tooling."""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from taidon_proxy.pgwire.errors import INVALID_PASSWORD, LocalProtocolError, RemoteProtocolError
from taidon_proxy.pgwire.reader import BodyReader, decode_text
from taidon_proxy.pgwire.saslprep import prepare_password

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
KEY_LENGTH = 32
FEATURE_NOT_SUPPORTED = "0A000"


@dataclass(frozen=True, repr=False)
class ScramVerifier:
    """A parsed `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` secret."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return f"ScramVerifier(iterations={self.iterations}, <secret>)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def parse_verifier(text: str) -> ScramVerifier:
    """Parse Postgres's SCRAM secret format; ValueError (without the secret) when invalid."""
    try:
        mech, iter_salt, keys = text.split("$")
        iter_text, salt_text = iter_salt.split(":")
        stored_text, server_text = keys.split(":")
        verifier = ScramVerifier(
            iterations=int(iter_text),
            salt=_unb64(salt_text),
            stored_key=_unb64(stored_text),
            server_key=_unb64(server_text),
        )
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ValueError("invalid SCRAM-SHA-256 verifier") from None
    if (
        mech != MECHANISM
        or verifier.iterations <= 0
        or not verifier.salt
        or len(verifier.stored_key) != KEY_LENGTH
        or len(verifier.server_key) != KEY_LENGTH
    ):
        raise ValueError("invalid SCRAM-SHA-256 verifier")
    return verifier


def make_verifier(password: str, *, salt: bytes, iterations: int = DEFAULT_ITERATIONS) -> str:
    """The verifier Postgres would store for `password` with this salt and iteration count."""
    if not salt or iterations <= 0:
        raise ValueError("salt must be non-empty and iterations positive")
    salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)
    stored_key = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    server_key = _hmac(salted, b"Server Key")
    return f"{MECHANISM}${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def parse_sasl_initial_response(payload: bytes) -> tuple[str, bytes]:
    """Split a SASLInitialResponse body into (mechanism, initial client data)."""
    reader = BodyReader(payload, "SASLInitialResponse")
    mechanism = decode_text(reader.cstring(), "SASL mechanism name")
    length = reader.int32()
    if length == -1:
        raise RemoteProtocolError("SASL initial response without client data is not supported")
    data = reader.take(length)
    reader.expect_end()
    return mechanism, data


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed SCRAM message: {detail}")


def _valid_nonce(nonce: str) -> bool:
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


def _attr(part: str, name: str) -> str:
    if not part.startswith(name + "="):
        raise _malformed(f"expected attribute {name!r}")
    return part[len(name) + 1 :]


class ScramPhase(enum.Enum):
    INITIAL = "initial"
    FIRST_SENT = "first_sent"
    DONE = "done"
    FAILED = "failed"


class ScramServer:
    """One SCRAM-SHA-256 exchange for one connection.

    With `verifier=None` (unknown user) it runs a mock exchange with a salt derived from
    `mock_secret` and the user name, failing only at the end, so no user enumeration.
    """

    def __init__(
        self,
        verifier: str | Sequence[str] | None,
        *,
        nonce: str,
        user: str = "",
        mock_secret: bytes = b"",
    ) -> None:
        if not _valid_nonce(nonce):
            raise ValueError("server nonce must be printable ASCII without ','")
        self._nonce = nonce
        self._user = user
        # Several verifiers (a user's access tokens) share one salt and iteration count: the
        # client's proof is checked against each, and `matched` says which one it fitted.
        texts = [verifier] if isinstance(verifier, str) else list(verifier or ())
        self.matched: int | None = None
        if not texts:
            self._mock = True
            salt = hashlib.sha256(user.encode("utf-8") + mock_secret).digest()[:16]
            self._verifiers = [ScramVerifier(DEFAULT_ITERATIONS, salt, bytes(32), bytes(32))]
        else:
            self._mock = False
            self._verifiers = [parse_verifier(t) for t in texts]
            first = self._verifiers[0]
            if any(
                (v.salt, v.iterations) != (first.salt, first.iterations) for v in self._verifiers
            ):
                raise LocalProtocolError(
                    "SCRAM verifiers of one exchange must share salt and iterations"
                )
        self._verifier = self._verifiers[0]
        self._phase = ScramPhase.INITIAL
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._combined_nonce = ""

    @property
    def phase(self) -> ScramPhase:
        return self._phase

    def _require(self, phase: ScramPhase, call: str) -> None:
        if self._phase is not phase:
            raise LocalProtocolError(f"{call} in SCRAM phase {self._phase.name}")

    def handle_initial(self, mechanism: str, data: bytes) -> bytes:
        """Process client-first-message; returns server-first-message."""
        self._require(ScramPhase.INITIAL, "handle_initial()")
        self._phase = ScramPhase.FAILED
        if mechanism != MECHANISM:
            raise RemoteProtocolError("client selected an invalid SASL authentication mechanism")
        text = self._decode(data)
        parts = text.split(",")
        if len(parts) < 4:
            raise _malformed("client-first-message is incomplete")
        flag, authzid = parts[0], parts[1]
        if flag.startswith("p="):
            raise _malformed("channel binding was requested, but this server does not offer it")
        if flag not in ("n", "y"):
            raise _malformed("unexpected channel-binding flag")
        if authzid:
            raise RemoteProtocolError(
                "client uses authorization identity, but it is not supported",
                sqlstate=FEATURE_NOT_SUPPORTED,
            )
        if parts[2].startswith("m="):
            raise RemoteProtocolError(
                "client requires an unsupported SCRAM extension", sqlstate=FEATURE_NOT_SUPPORTED
            )
        _attr(parts[2], "n")  # Postgres ignores it: the startup packet's user counts
        client_nonce = _attr(parts[3], "r")
        if not _valid_nonce(client_nonce):
            raise _malformed("invalid client nonce")
        self._gs2_header = f"{flag},,"
        self._client_first_bare = ",".join(parts[2:])
        self._combined_nonce = client_nonce + self._nonce
        v = self._verifier
        self._server_first = f"r={self._combined_nonce},s={_b64(v.salt)},i={v.iterations}"
        self._phase = ScramPhase.FIRST_SENT
        return self._server_first.encode("ascii")

    def handle_final(self, data: bytes) -> bytes:
        """Verify client-final-message; returns server-final-message or raises."""
        self._require(ScramPhase.FIRST_SENT, "handle_final()")
        self._phase = ScramPhase.FAILED
        text = self._decode(data)
        head, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise _malformed("client proof is missing")
        parts = head.split(",")
        if len(parts) < 2:
            raise _malformed("client-final-message is incomplete")
        for ext in parts[2:]:
            if len(ext) < 2 or ext[1] != "=" or not ext[0].isalpha() or ext[0] == "p":
                raise _malformed("unexpected attribute in client-final-message")
        try:
            binding = _unb64(_attr(parts[0], "c"))
            proof = _unb64(proof_text)
        except (binascii.Error, UnicodeEncodeError):
            raise _malformed("invalid base64") from None
        if binding != self._gs2_header.encode("ascii"):
            raise _malformed("SCRAM channel binding check failed")
        if _attr(parts[1], "r") != self._combined_nonce:
            raise _malformed("nonce does not match")
        if len(proof) != KEY_LENGTH:
            raise _malformed("invalid client proof")
        auth_message = ",".join((self._client_first_bare, self._server_first, head)).encode()
        found: ScramVerifier | None = None
        for i, v in enumerate(self._verifiers):  # every one, whichever matches
            signature = _hmac(v.stored_key, auth_message)
            client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
            fits = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
            if fits and found is None:
                found, self.matched = v, i
        if self._mock or found is None:
            raise RemoteProtocolError(
                f'password authentication failed for user "{self._user}"',
                sqlstate=INVALID_PASSWORD,
            )
        self._phase = ScramPhase.DONE
        return f"v={_b64(_hmac(found.server_key, auth_message))}".encode("ascii")

    @staticmethod
    def _decode(data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("not valid UTF-8") from None
