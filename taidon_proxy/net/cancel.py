"""Cancel keys handed to clients, and where a CancelRequest carrying one goes."""

from __future__ import annotations

from typing import Protocol

import structlog

log = structlog.get_logger("taidon.cancel")

Key = tuple[int, bytes]  # (pid, secret) as the client was told


class Cancellable(Protocol):
    keys: list[Key]

    async def forward_cancel(self) -> None: ...


class CancelKeys:
    """Routes by (pid, secret): pids of different instances can be equal."""

    def __init__(self) -> None:
        self._by_key: dict[Key, Cancellable] = {}

    def register(self, owner: Cancellable, key: Key) -> None:
        self._by_key[key] = owner

    def forget(self, owner: Cancellable) -> None:
        for key in owner.keys:
            if self._by_key.get(key) is owner:
                del self._by_key[key]

    async def cancel(self, pid: int, secret: bytes) -> None:
        owner = self._by_key.get((pid, secret))
        if owner is None:
            log.info("cancel.unknown_key")
            return
        await owner.forward_cancel()
