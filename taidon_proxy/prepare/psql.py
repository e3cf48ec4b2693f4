"""Recipes of kind psql: ordered SQL files, one state per file, includes expanded for the hash."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from taidon_proxy.config import PsqlPrepare
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare import provenance
from taidon_proxy.prepare.chain import ChainStep, build_chain, planned
from taidon_proxy.prepare.context import BuildContext, BuildResult, PlannedStep
from taidon_proxy.runtimes.base import InstanceHandle
from taidon_proxy.store.ids import canonical

_INCLUDE = re.compile(rb"^\s*\\(i|include|ir|include_relative)\s+('([^']*)'|(\S+))\s*$")
MAX_INCLUDE_DEPTH = 16
PSQL_TIMEOUT = 3600.0


@dataclass(frozen=True)
class PsqlStep:
    file: Path  # as given (absolute)
    display: str  # relative to the recipe's base directory, for messages
    step_hash: str
    inputs: tuple[Path, ...]  # the file and everything it includes

    @property
    def chain(self) -> ChainStep:
        return ChainStep(self.step_hash, self.display, self.display)


def expand(
    path: Path,
    cwd: Path,
    *,
    depth: int = 0,
    stack: tuple[Path, ...] = (),
    confine: Path | None = None,
) -> tuple[bytes, list[Path]]:
    """Content of a SQL file with \\i / \\ir includes expanded as psql would resolve them.

    \\i is relative to psql's working directory, \\ir to the including file's directory. With
    `confine` (a git ref's checkout), an include that resolves outside it is refused.
    """
    if depth > MAX_INCLUDE_DEPTH:
        raise BuildFailed(f"{path.name}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
    if path in stack:
        raise BuildFailed(f"{path.name}: include cycle")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BuildFailed(f"cannot read SQL file {path.name}: {e.strerror}") from None
    out: list[bytes] = []
    inputs = [path]
    for line in data.splitlines(keepends=True):
        m = _INCLUDE.match(line.rstrip(b"\r\n"))
        if not m:
            out.append(line)
            continue
        target = (m.group(3) if m.group(3) is not None else m.group(4)).decode()
        base = path.parent if m.group(1) in (b"ir", b"include_relative") else cwd
        inc = Path(target) if Path(target).is_absolute() else base / target
        if confine is not None and not inc.resolve().is_relative_to(confine.resolve()):
            raise BuildFailed(
                f"{path.name} includes {target}, which is outside the files read from git"
            )
        if not inc.is_file():
            raise BuildFailed(f"{path.name} includes {target}, which does not exist")
        content, more = expand(inc, cwd, depth=depth + 1, stack=(*stack, path), confine=confine)
        out.append(b"-- include " + target.encode() + b"\n" + content + b"\n")
        inputs += more
    return b"".join(out), inputs


def plan_steps(prep: PsqlPrepare, base: Path, confine: Path | None = None) -> list[PsqlStep]:
    variables = canonical(prep.variables)
    steps = []
    for f in prep.files:
        content, inputs = expand(f, base, confine=confine)
        h = hashlib.sha256()
        h.update(content)
        h.update(b"\x00vars\x00" + variables.encode())
        try:
            display = str(f.relative_to(base))
        except ValueError:
            display = f.name
        steps.append(PsqlStep(f, display, h.hexdigest(), tuple(inputs)))
    return steps


class PsqlAdapter:
    """Builds psql recipes: clone the deepest cached prefix, run each remaining file with psql."""

    kind = "psql"

    def __init__(self, psql_bin: Path) -> None:
        self.psql_bin = psql_bin
        self._version: str | None = None

    async def version(self) -> str:
        """`psql --version` (once): the tool's version in each state's provenance."""
        if self._version is None:
            proc = await asyncio.create_subprocess_exec(
                str(self.psql_bin), "--version", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await proc.communicate()
            self._version = out.decode(errors="replace").strip() or "unknown"
        return self._version

    async def plan(self, ctx: BuildContext) -> list[PlannedStep]:
        assert isinstance(ctx.recipe.prepare, PsqlPrepare)
        steps = await asyncio.to_thread(plan_steps, ctx.recipe.prepare, ctx.base_dir, ctx.confine)
        return await planned(ctx, "psql", [s.chain for s in steps])

    async def build(self, ctx: BuildContext) -> BuildResult:
        prep = ctx.recipe.prepare
        assert isinstance(prep, PsqlPrepare)
        try:
            steps = await asyncio.to_thread(plan_steps, prep, ctx.base_dir, ctx.confine)
        except BuildFailed as e:
            e.inputs = [str(f) for f in prep.files]
            raise
        inputs = sorted({str(p) for s in steps for p in s.inputs})
        try:
            return await self._build(ctx, prep, steps, inputs)
        except BuildFailed as e:
            e.inputs = inputs
            raise

    async def _build(
        self, ctx: BuildContext, prep: PsqlPrepare, steps: list[PsqlStep], inputs: list[str]
    ) -> BuildResult:
        async def run(i: int, handle: InstanceHandle) -> None:
            await self._run_file(steps[i], prep, ctx, str(handle.socket_dir), handle.port)

        version = await self.version()
        variables = provenance.hashed(prep.variables)

        def recorded(s: PsqlStep) -> ChainStep:
            rec = provenance.step(
                ctx, "psql", version, file=s.display, files=provenance.files(ctx, s.inputs),
                variables=variables,
            )  # fmt: skip
            return dataclasses.replace(s.chain, record=rec)

        chain = await asyncio.to_thread(lambda: [recorded(s) for s in steps])
        return await build_chain(ctx, "psql", chain, run, noun="file", inputs=inputs)

    async def _run_file(
        self, step: PsqlStep, prep: PsqlPrepare, ctx: BuildContext, host: str, port: int
    ) -> None:
        argv = [
            str(self.psql_bin), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-psqlrc",
            "-h", host, "-p", str(port), "-U", "postgres", "-d", ctx.database,
        ]  # fmt: skip
        for k, v in sorted(prep.variables.items()):
            argv += ["-v", f"{k}={v}"]
        argv += ["-f", str(step.file)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ctx.base_dir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={"PGAPPNAME": "taidon-prepare", "PATH": "/usr/bin:/bin"},
        )
        try:
            async with asyncio.timeout(PSQL_TIMEOUT):
                _, err = await proc.communicate()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        # Clients see paths relative to the recipe, never the host's layout.
        text = err.decode(errors="replace").strip().replace(str(step.file), step.display)
        for line in text.splitlines():
            ctx.job.emit("log", line)
        if proc.returncode != 0:
            raise BuildFailed(
                f"{step.display} failed: {_first_error(text) or f'psql exit {proc.returncode}'}",
                detail=text[-2000:] or None,
            )


def _first_error(stderr: str) -> str:
    """psql's 'psql:FILE:LINE: ERROR:  message' line, minus the 'psql:' prefix."""
    for line in stderr.splitlines():
        if "ERROR:" in line or "FATAL:" in line:
            return line.removeprefix("psql:").strip()
    return stderr.splitlines()[-1] if stderr else ""
