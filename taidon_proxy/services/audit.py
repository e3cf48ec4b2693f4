"""The audit log's use-cases: record what happened and who did it; query, export, verify."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from taidon_proxy.prepare.jobs import Job
from taidon_proxy.services.errors import invalid
from taidon_proxy.store.audit import AuditFilter, AuditLog, Verification

log = structlog.get_logger("taidon.audit")

# What is recorded (one record each); docs/audit.md lists each kind's fields.
KINDS = (
    "connection",  # every client connection, at its end
    "auth_failure",  # a connection whose authentication failed
    "build",
    "reset",
    "snapshot",
    "pin",
    "unpin",
    "state_removal",
    "instance_removal",
    "drain",
    "reload",
    "quota_refusal",  # a connection refused by a quota (instances 53300, disk 53100)
    "login",  # a sign-in through the OIDC provider (docs/team-server.md)
    "login_failure",  # a refused one: why, never who (the token was not believed)
)
ADMIN = "admin"  # the actor of admin API calls (the one admin token)
PROXY = "proxy"  # the actor of what the proxy does itself (builds)
SIGNAL = "signal"  # a reload by SIGHUP
MAX_LIMIT = 10_000
# A field named like a secret is refused: nothing of the kind belongs in the log.
_SECRET = re.compile(r"password|passwd|secret|token|scram|verifier|proof|nonce", re.I)
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(field: str, text: str, now: float) -> float:
    """Epoch seconds, an ISO 8601 time (UTC unless it says otherwise), or an age: 90s, 15m,
    2h, 7d (that long before now)."""
    text = text.strip()
    ago = _AGO.match(text)
    if ago:
        return now - float(ago.group(1)) * _UNIT[ago.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(
            field, f"not a time: {text!r} (epoch seconds, ISO 8601, or an age like 15m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@functools.lru_cache(maxsize=256)
def _check_names(names: tuple[str, ...]) -> None:
    """The few field sets in use are checked once each (this runs for every connection)."""
    secret = [k for k in names if _SECRET.search(k)]
    if secret:
        raise ValueError(f"audit fields may not hold secrets: {', '.join(secret)}")


class Audit:
    """What the edges and the wiring call. `record` never waits: records are written in
    batches by the store (docs/audit.md, "Durability")."""

    def __init__(self, store: AuditLog, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def record(self, kind: str, *, actor: str, **fields: Any) -> int | None:
        """Append one record; its seq (None if the log is closed: logged, never raised)."""
        if kind not in KINDS:
            raise ValueError(f"unknown audit kind {kind!r}")
        _check_names(tuple(fields))
        try:
            return self._store.append(kind, actor, fields, round(self._clock(), 6))
        except RuntimeError:
            log.error("audit.record_lost", kind=kind, actor=actor)
            return None

    def build_done(self, job: Job, seconds: float) -> None:
        """A build job ended (the builder's hook). Its error text stays in the job's log:
        a tool's output may quote anything, secrets included."""
        self.record(
            "build", actor=PROXY, job=job.id, alias=job.alias, result=job.status,
            duration=round(seconds, 3), state=job.target,
        )  # fmt: skip

    async def query(
        self,
        *,
        user: str | None = None,
        alias: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The newest `limit` matching records, oldest first (`user` is the actor)."""
        if kind is not None and kind not in KINDS:
            raise invalid("kind", f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        if not 1 <= limit <= MAX_LIMIT:
            raise invalid("limit", f"must be 1 to {MAX_LIMIT}")
        now = self._clock()
        f = AuditFilter(
            actor=user, alias=alias, kind=kind, limit=limit,
            since=parse_time("since", since, now) if since else None,
            until=parse_time("until", until, now) if until else None,
        )  # fmt: skip
        return [r.as_dict() for r in await self._store.query(f)]

    async def export(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Every record in seq order, a page at a time."""
        await self._store.flush()
        after = 0
        while page := await self._store.chunk(after):
            yield [r.as_dict() for r in page]
            after = page[-1].seq

    async def verify(self) -> Verification:
        return await self._store.verify()
