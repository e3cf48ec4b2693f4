"""The dashboard's browser sessions: random ids in memory, each with an expiry and a CSRF token.

The cookie carries only the session id, never the admin token. Sessions live as long as the
admin server (a restart signs everyone out) and end at their expiry or at sign-out.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from taidon_proxy.services.access import Principal

COOKIE = "taidon_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 8 * 3600.0
MAX_SESSIONS = 1000  # the oldest go first: a script signing in in a loop cannot fill memory


@dataclass(frozen=True)
class BrowserSession:
    id: str
    csrf: str
    principal: Principal  # who signed in (ADMIN for the admin token)
    expires: float

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


class SessionStore:
    def __init__(
        self, lifetime: float = SESSION_SECONDS, clock: Callable[[], float] = time.time
    ) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._sessions: dict[str, BrowserSession] = {}

    def open(self, principal: Principal) -> BrowserSession:
        self._prune()
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        s = BrowserSession(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            principal=principal,
            expires=self._clock() + self.lifetime,
        )
        self._sessions[s.id] = s
        return s

    def get(self, sid: str | None) -> BrowserSession | None:
        """The live session of that id; an expired one is forgotten and gives None."""
        if not sid:
            return None
        s = self._sessions.get(sid)
        if s is None:
            return None
        if s.expires <= self._clock():
            del self._sessions[sid]
            return None
        return s

    def close(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def expire_all(self) -> None:
        """End every session now (their cookies then lead to the sign-in page)."""
        self._sessions.clear()

    def _prune(self) -> None:
        now = self._clock()
        for sid in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[sid]
