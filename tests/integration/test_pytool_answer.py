"""A runner's answer reaches the proxy whole, however large (a plan of hundreds of migrations)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from taidon_proxy.prepare.pytool import run_runner

pytestmark = pytest.mark.integration

RUNNER = """
import sys


def big(args):
    print("some output of the tool", flush=True)
    print("x" * 20000, flush=True)  # an over-long output line is cut; the answer is not
    return {"steps": [{"name": f"{i:04d}_migration", "hash": "ab" * 32} for i in range(args["n"])]}


def broken(args):
    raise KeyError("nope")
"""


def test_a_large_answer_arrives_whole(tmp_path: Path) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    answer = asyncio.run(
        run_runner(runner, "big", {"n": 3000}, python=None, cwd=tmp_path, env={}, deadline_s=60)
    )
    assert answer.returncode == 0
    assert answer.result is not None and len(answer.result["steps"]) == 3000
    assert answer.result["steps"][-1]["name"] == "2999_migration"
    assert answer.lines[0] == "some output of the tool"


def test_a_runner_error_is_its_answer(tmp_path: Path) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    answer = asyncio.run(
        run_runner(runner, "broken", {}, python=None, cwd=tmp_path, env={}, deadline_s=60)
    )
    assert answer.returncode == 1
    assert answer.result == {"error": "KeyError: 'nope'"}
