"""Recipes of kind command: any migration command, one state, hashed over its declared inputs."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from taidon_proxy.config import CommandPrepare
from taidon_proxy.config_checks import expand_globs, glob_dirs
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare import provenance
from taidon_proxy.prepare.context import BuildContext, BuildResult, PlannedStep
from taidon_proxy.prepare.toolrun import run_tool, server_env
from taidon_proxy.store.ids import canonical, step_state_id

VERSION_TIMEOUT = 120.0
# What a tool finds in its environment besides the recipe's own env: enough to run npx & co.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")


@dataclass(frozen=True)
class CommandStep:
    step_hash: str
    label: str
    files: tuple[Path, ...]  # every input, sorted
    version: str | None


def step_hash(prep: CommandPrepare, base: Path, version: str | None) -> tuple[str, list[Path]]:
    files = expand_globs(prep.inputs, base)
    if not files:
        raise BuildFailed("command recipe: its inputs match no file")
    h = hashlib.sha256()
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise BuildFailed(f"cannot read input {_rel(f, base)}: {e.strerror}") from None
        rel = _rel(f, base).encode()
        h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    h.update(b"\x00argv\x00" + "\x00".join(prep.run).encode())
    h.update(b"\x00env\x00" + canonical(prep.env).encode())
    h.update(b"\x00version\x00" + (version or "").encode())
    return h.hexdigest(), files


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)


class CommandAdapter:
    """Runs the recipe's command once on a clone of the root state; the result is one state."""

    kind = "command"

    async def _step(self, ctx: BuildContext) -> CommandStep:
        prep = ctx.recipe.prepare
        assert isinstance(prep, CommandPrepare)
        version = await self._version(ctx, prep) if prep.version else None
        h, files = await asyncio.to_thread(step_hash, prep, ctx.base_dir, version)
        label = " ".join(prep.run)
        if version:
            label += f" ({version})"
        return CommandStep(h, label[:200], tuple(files), version)

    async def _version(self, ctx: BuildContext, prep: CommandPrepare) -> str:
        assert prep.version is not None
        lines: list[str] = []
        try:
            res = await run_tool(
                prep.version, cwd=ctx.base_dir, env=self._env(prep, {}),
                deadline_s=VERSION_TIMEOUT, on_line=lines.append,
            )  # fmt: skip
        except OSError as e:
            raise BuildFailed(
                f"cannot run version command {prep.version[0]}: {e.strerror}"
            ) from None
        if res.returncode != 0:
            why = "timed out" if res.timed_out else f"exit {res.returncode}"
            raise BuildFailed(f"version command {' '.join(prep.version)} failed ({why})")
        return " ".join(line.strip() for line in lines if line.strip())[:200]

    def _env(self, prep: CommandPrepare, server: dict[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        return {**env, **prep.env, **server}

    async def plan(self, ctx: BuildContext) -> list[PlannedStep]:
        step = await self._step(ctx)
        sid = step_state_id(ctx.root_state, "command", step.step_hash)
        return [PlannedStep(sid, step.label, await ctx.has_state(sid))]

    async def build(self, ctx: BuildContext) -> BuildResult:
        prep = ctx.recipe.prepare
        assert isinstance(prep, CommandPrepare)
        step = await self._step(ctx)
        # The searched directories too: a new file under a glob must miss the fast path.
        dirs = await asyncio.to_thread(glob_dirs, prep.inputs, ctx.base_dir)
        inputs = [str(f) for f in (*step.files, *dirs)]
        sid = step_state_id(ctx.root_state, "command", step.step_hash)
        if await ctx.has_state(sid):
            ctx.job.emit("progress", "command state cached")
            return BuildResult(sid, inputs)
        if step.version:
            ctx.job.emit("log", f"tool version: {step.version}")
        session = await ctx.open_session(ctx.root_state)
        try:
            ctx.job.emit("step.start", f"running {' '.join(prep.run)} (1/1)")
            session.begin_step()
            handle = await session.start()
            env = self._env(prep, server_env(handle, ctx.database))
            try:
                res = await run_tool(
                    prep.run, cwd=ctx.base_dir, env=env, deadline_s=prep.timeout,
                    on_line=lambda line: ctx.job.emit("progress", line),
                )  # fmt: skip
            except OSError as e:
                err = BuildFailed(f"cannot run {prep.run[0]}: {e.strerror}")
                err.inputs = inputs
                raise err from None
            if res.returncode != 0:
                why = (
                    f"timed out after {prep.timeout:g}s"
                    if res.timed_out
                    else f"exited with status {res.returncode}"
                )
                last = "\n".join(res.tail[-10:])
                err = BuildFailed(
                    f"command {' '.join(prep.run)} {why}"
                    + (f": {_telling_line(res.tail)}" if res.tail else ""),
                    detail=last or None,
                )
                err.inputs = inputs
                raise err
            record = provenance.step(
                ctx, prep.run[0], step.version, argv=list(prep.run),
                files=await asyncio.to_thread(provenance.files, ctx, step.files),
                env=provenance.hashed(prep.env),
            )  # fmt: skip
            await session.commit("command", step.step_hash, step.label, provenance=record)
        finally:
            await session.close()
        return BuildResult(sid, inputs)


_ERROR_WORDS = ("error", "fatal", "failed", "exception")


def _telling_line(tail: list[str]) -> str:
    """The line that says what went wrong: the last one naming an error (tools often end with
    a caret, a context line or a stack frame), else the last non-blank one."""
    lines = [line.strip() for line in tail if line.strip()]
    for line in reversed(lines):
        if any(w in line.lower() for w in _ERROR_WORDS):
            return line
    return lines[-1] if lines else ""
