"""A use-case's background loop: started with the proxy, cancelled when it closes."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundLoop:
    """Subclasses write `_run` (their loop); `start` and `close` are the proxy's."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
