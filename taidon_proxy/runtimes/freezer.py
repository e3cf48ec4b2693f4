"""Signalling a whole process tree: pause it (SIGSTOP/SIGCONT, parents first) or kill it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from taidon_proxy.runtimes import proctree
from taidon_proxy.runtimes.base import RuntimeError_

STOP_WAIT_S = 5.0


async def freeze_tree(pid: int) -> list[int]:
    """Stop `pid`, then its descendants; return every stopped pid, in stopping order.

    Each wait lasts until the kernel reports the processes stopped, not just signalled.
    On failure, whatever was stopped is resumed before the error propagates.
    """
    frozen = [pid]
    try:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        await _until_stopped([pid])
        # A stopped parent forks no more; a child's own children are caught on the next pass.
        for _ in range(5):
            new = [p for p in proctree.descendants(pid) if p not in frozen]
            if not new:
                break
            for child in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGSTOP)
            frozen += new
            await _until_stopped(new)
    except BaseException:
        thaw_tree(frozen)
        raise
    return frozen


def thaw_tree(frozen: list[int]) -> None:
    """Resume what `freeze_tree` stopped, children first, the parent last."""
    for pid in reversed(frozen):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def kill_tree(pid: int, sig: signal.Signals) -> list[int]:
    """Send `sig` to `pid` and all its descendants; return the pids signalled.

    The parent is stopped first so it forks nothing new while its children are listed,
    and everything is continued afterwards so stopped processes act on `sig`.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    tree = [pid, *proctree.descendants(pid)]
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    thaw_tree(tree)
    return tree


async def _until_stopped(pids: list[int]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_WAIT_S
    while not all(proctree.is_stopped(p) for p in pids):
        if loop.time() > deadline:
            raise RuntimeError_(f"processes {pids} did not stop within {STOP_WAIT_S}s")
        await asyncio.sleep(0.001)
