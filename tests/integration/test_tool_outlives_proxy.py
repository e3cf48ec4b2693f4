"""A migration tool dies with the proxy that started it (a SIGKILLed proxy leaves no tool
writing to a build server nobody will commit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

# A parent that starts `sleep` the way the proxy starts a command recipe's tool, then waits.
PARENT = """
import asyncio, sys
from pathlib import Path
from taidon_proxy.prepare.toolrun import run_tool

async def main() -> None:
    await run_tool([sys.argv[1], "300"], cwd=Path("."), env={}, deadline_s=600,
                   on_line=lambda line: None)

asyncio.run(main())
"""


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_tool_is_killed_when_its_proxy_is(tmp_path: Path) -> None:
    sleep = tmp_path / "sleep-tool"  # a name of our own: nothing else on the machine has it
    sleep.symlink_to("/bin/sleep")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(sleep)], cwd=REPO)
    tool = None
    try:
        deadline = time.monotonic() + 30
        while tool is None:
            assert parent.poll() is None and time.monotonic() < deadline, "tool never started"
            kids = children_of(parent.pid)
            if kids and Path(f"/proc/{kids[0]}/exe").resolve() == Path("/bin/sleep").resolve():
                tool = kids[0]
            time.sleep(0.05)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(tool):
            assert time.monotonic() < deadline, "the tool outlived its proxy"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        if tool is not None and alive(tool):
            os.kill(tool, signal.SIGKILL)
