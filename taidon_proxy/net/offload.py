"""Hands spliced sessions to the C relay thread (`_splice`) and reports back how each ended.

The Python splice in `relay.py` costs two Python callbacks per request/response pair; on
two cores that CPU is what the database needs (pgbench select-only: see
docs/benchmarks.md). Sessions without TLS therefore move their bytes in C once their
startup is done. The descriptors stay owned by the Python transports: a session closes
them only after the relay has reported the pair ended (never while the thread may use them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple, Protocol, cast


class _RelayApi(Protocol):
    notify_fd: int

    def add(
        self,
        client_fd: int,
        instance_fd: int,
        keep_server: bool = ...,
        ready: int = ...,
        unanswered: int = ...,
        /,
    ) -> int: ...
    def stop(self, pair: int, /) -> bool: ...
    def counts(self, pair: int, /) -> tuple[int, int]: ...
    def collect(self) -> list[tuple[int, str, bool, bytes, bytes, int, int, bool, bytes, bool]]: ...
    def close(self) -> None: ...


_EndedFields = tuple[str, bool, bytes, bytes, int, int, bool, bytes, bool]


def _load() -> Callable[[], _RelayApi] | None:
    try:
        from taidon_proxy.net import _splice  # type: ignore[attr-defined]  # C extension
    except ImportError:
        return None
    return cast(Callable[[], _RelayApi], _splice.Relay)


_RELAY = _load()


class Ended(NamedTuple):
    """How a relayed pair ended."""

    # "client" or "instance" (that side closed or failed), "stopped", "failed", or
    # "terminated": the client sent Terminate, which was withheld (keep_server).
    reason: str
    at_boundary: bool  # the instance's stream ended between two messages
    unsent_to_client: bytes
    unsent_to_instance: bytes
    bytes_up: int  # client -> instance, while relayed here
    bytes_down: int  # instance -> client
    client_terminated: bool = False  # the client's last message was a Terminate
    ready_status: bytes = b""  # b"I"/b"T"/b"E" if the instance's stream ended after ReadyForQuery
    ended_with_error: bool = False  # its last message was an ErrorResponse (a FATAL, then gone)


def available() -> bool:
    """Whether the C extension was built (scripts/setup builds it; else the Python relay)."""
    return _RELAY is not None


class NativeRelay:
    """One relay thread for a proxy; callbacks run on the event loop."""

    def __init__(self) -> None:
        assert _RELAY is not None, "check available() first"
        self._relay = _RELAY()
        self._loop = asyncio.get_running_loop()
        self._ends: dict[int, Callable[[Ended], None]] = {}
        self._loop.add_reader(self._relay.notify_fd, self._collect)
        self._closed = False

    def add(
        self, client_fd: int, instance_fd: int, on_end: Callable[[Ended], None], *,
        keep_server: bool = False, ready: bytes = b"", unanswered: int = 0,
    ) -> int:  # fmt: skip
        """Relay a pair; with keep_server it ends before the client's Terminate (which the
        instance never sees) if every query has been answered. `ready`: the status of the
        ReadyForQuery passed on last; `unanswered`: queries sent but not answered yet."""
        pair = self._relay.add(
            client_fd, instance_fd, keep_server, ready[0] if ready else 0, unanswered
        )
        self._ends[pair] = on_end
        return pair

    def stop(self, pair: int) -> None:
        """End a pair soon; its on_end runs once the thread has let go of both sockets."""
        self._relay.stop(pair)

    def counts(self, pair: int) -> tuple[int, int]:
        return self._relay.counts(pair)

    def _collect(self) -> None:
        for pair, *rest in self._relay.collect():
            on_end = self._ends.pop(pair, None)
            if on_end is not None:
                on_end(Ended(*cast(_EndedFields, rest)))

    def close(self) -> None:
        """Stop the thread; pairs still running end as "stopped" (their sockets untouched)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._relay.notify_fd)
        self._relay.close()
        self._collect()
        for pair, on_end in list(self._ends.items()):
            up, down = self._relay.counts(pair)
            del self._ends[pair]
            on_end(Ended("stopped", False, b"", b"", up, down))
