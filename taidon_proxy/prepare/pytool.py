"""Our runner scripts in a project's own Python: argv, environment, the one JSON answer line,
and how their paths and failures are shown to a client."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare import pytool_entry
from taidon_proxy.prepare.toolrun import run_tool

ENTRY = Path(pytool_entry.__file__)
# What the project's interpreter finds in its environment besides the build server's variables.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH")
DETAIL_LINES = 20


@dataclass(frozen=True)
class RunnerAnswer:
    result: dict[str, Any] | None  # the runner's answer line; None if it never gave one
    lines: list[str]  # every other output line
    returncode: int | None  # None: killed at the deadline

    @property
    def ok(self) -> bool:
        return self.result is not None and "error" not in self.result

    def why(self, deadline_s: float) -> str:
        if self.returncode is None:
            return f"timed out after {deadline_s:g}s"
        if self.result is not None and "error" in self.result:
            return str(self.result["error"])
        return self.lines[-1] if self.lines else f"exit {self.returncode}"

    def failure(self, what: str, base: Path, deadline_s: float) -> BuildFailed:
        """`what: why`, the output's last lines (and the error's own further lines) as DETAIL."""
        extra = self.result.get("detail") if self.result else None
        tail = [*self.lines[-DETAIL_LINES:], *([str(extra)] if extra else [])]
        return BuildFailed(
            scrub(f"{what}: {self.why(deadline_s)}", base),
            detail=scrub("\n".join(tail), base) or None,
        )


def checkout_env(at_ref: bool) -> dict[str, str]:
    """At a git ref the project's files are a checkout shared by every ref with that tree:
    Python writes no __pycache__ into it."""
    return {"PYTHONDONTWRITEBYTECODE": "1"} if at_ref else {}


def python_of(configured: Path | None) -> str:
    """The recipe's interpreter, else the proxy's own."""
    return str(configured) if configured is not None else sys.executable


def runner_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def run_runner(
    runner: Path, function: str, args: dict[str, Any], *, python: Path | None, cwd: Path,
    env: dict[str, str], deadline_s: float, on_line: Callable[[str], None] | None = None,
) -> RunnerAnswer:  # fmt: skip
    """`function(args)` of a runner file in the project's interpreter, its output to on_line."""
    lines: list[str] = []

    def take(line: str) -> None:
        lines.append(line)
        if on_line is not None:
            on_line(line)

    with tempfile.TemporaryDirectory(prefix="taidon-answer-") as tmp:
        answer = Path(tmp) / "answer.json"
        argv = [python_of(python), str(ENTRY), str(runner), function, json.dumps(args), str(answer)]
        try:
            res = await run_tool(
                argv, cwd=cwd, env=runner_env(env), deadline_s=deadline_s, on_line=take
            )
        except OSError as e:
            raise BuildFailed(f"cannot run {argv[0]}: {e.strerror}") from None
        result = _read_answer(answer)
    return RunnerAnswer(result, lines, res.returncode)


def _read_answer(path: Path) -> dict[str, Any] | None:
    """The runner's answer; None if it never wrote one (killed, or it crashed before)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def hash_field(h: hashlib._Hash, label: str, data: bytes) -> None:
    h.update(f"\x00{label}\x00".encode() + data)


def read_input(path: Path, base: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BuildFailed(f"cannot read {shown(path, base)}: {e.strerror}") from None


def shown(p: Path, base: Path) -> str:
    """A path as a client may see it: relative to the recipe's directory, else its name."""
    try:
        return str(p.resolve().relative_to(base))
    except ValueError:
        return p.name


def scrub(text: str, base: Path) -> str:
    """Clients see paths relative to the recipe, never the host's layout."""
    return text.replace(f"{base}{os.sep}", "").replace(str(base), ".")
