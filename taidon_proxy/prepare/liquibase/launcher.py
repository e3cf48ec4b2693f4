"""Running the Liquibase CLI: finding it, the arguments we allow, its output and its errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from childproc import dies_with_parent
from taidon_proxy.config import Config, LiquibasePrepare
from taidon_proxy.errors import BuildFailed

TOOLS_LAUNCHER = Path(".tools/node_modules/liquibase/dist/liquibase/liquibase")
REPO_ROOT = Path(__file__).resolve().parents[3]
INSTALL_HINT = (
    "install it with `scripts/setup --full` (npm package liquibase@4.28.1 into .tools/),"
    " put `liquibase` on PATH, or set liquibase.exec in the config"
)
RUN_TIMEOUT = 3600.0
TAIL_LINES = 60
# A short JVM start: both runs are dominated by start-up, not by compiled hot loops, and
# the plan and the update share two cores while they start side by side.
PLAN_JAVA_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:CICompilerCount=1"
UPDATE_JAVA_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"

# Settings a recipe must not set: the proxy owns the connection and the command.
_FORBIDDEN = frozenset({
    "url", "username", "password", "driver", "classpath", "driverpropertiesfile", "defaultsfile",
    "referenceurl", "referenceusername", "referencepassword", "referencedriver",
    "changelogfile", "searchpath", "contexts", "contextfilter", "labels", "labelfilter",
    "defaultschemaname", "defaultcatalogname", "liquibaseschemaname", "liquibasecatalogname",
    "databasechangelogtablename", "databasechangeloglocktablename", "outputfile", "logfile",
    "loglevel", "propertyproviderclass", "includesystemclasspath", "duplicatefilemode",
})  # fmt: skip


def _normalize(key: str) -> str:
    k = key.lower()
    for prefix in ("liquibase.command.", "liquibase."):
        k = k.removeprefix(prefix)
    return re.sub(r"[^a-z0-9]", "", k)


def check_parameters(parameters: dict[str, str]) -> None:
    """Changelog parameters only: keys that would set a connection or Liquibase setting fail."""
    for key in parameters:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise BuildFailed(f"changelog parameter {key!r}: not a valid parameter name")
        if key.lower().startswith("liquibase.") or _normalize(key) in _FORBIDDEN:
            raise BuildFailed(
                f"changelog parameter {key!r} would set a Liquibase or connection setting;"
                " the proxy supplies the connection, and recipes set contexts/labels by key",
                hint="parameters are changelog parameters (${name} substitutions) only",
            )


def find_launcher(cfg: Config) -> Path:
    """liquibase.exec, else `liquibase` on PATH, else the repo's or the config dir's .tools."""
    base = cfg.source.resolve().parent if cfg.source else Path.cwd()
    wanted = cfg.liquibase.exec
    if wanted != "auto":
        p = Path(wanted).expanduser()
        p = p if p.is_absolute() else base / p
        if p.is_file() and os.access(p, os.X_OK):
            return p
        found = shutil.which(wanted)
        if found:
            return Path(found)
        raise BuildFailed(
            f"Liquibase not found: liquibase.exec {wanted!r} is not an executable file",
            hint=INSTALL_HINT,
        )
    on_path = shutil.which("liquibase")
    if on_path:
        return Path(on_path)
    for root in (REPO_ROOT, base):
        p = root / TOOLS_LAUNCHER
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise BuildFailed("Liquibase is not installed", hint=INSTALL_HINT)


def recipe_args(prep: LiquibasePrepare) -> list[str]:
    """The command options every run of this recipe gets (changelog, filters, parameters)."""
    args = [f"--changelog-file={prep.changelog}"]
    if prep.contexts:
        args.append(f"--contexts={prep.contexts}")
    if prep.labels:
        args.append(f"--label-filter={prep.labels}")
    args += [f"-D{k}={v}" for k, v in sorted(prep.parameters.items())]
    return args


def global_args(prep: LiquibasePrepare) -> list[str]:
    search = ",".join(str(p) for p in prep.search_path)
    return ["--show-banner=false", f"--search-path={search}"]


# The JVM reports on the archive (classes it skips, a mismatch it ignores) on stdout, where
# Liquibase's own messages are read: keep those reports out.
_QUIET_CDS = "-Xlog:cds*=off -Xlog:class+path=off"


class ClassArchive:
    """A class-data-sharing archive of Liquibase's classes, kept beside the store.

    A JVM that maps it loads and verifies ~15% less at start (both runs of a prepare start a
    JVM). The first plan run writes it at exit (`-XX:ArchiveClassesAtExit`); later runs use it.
    It is keyed by the launcher and the java binary; the JVM itself checks that the archive
    fits its class path and version and ignores an archive that does not.
    """

    def __init__(self, directory: Path, launcher: Path) -> None:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        try:
            stamp = launcher.resolve().stat().st_mtime_ns
            java_path = str(Path(java).resolve()) if java else ""
        except OSError:
            stamp, java_path = 0, ""
        key = hashlib.sha256(f"{launcher.resolve()}\0{stamp}\0{java_path}".encode()).hexdigest()
        self.directory = directory
        self.path = directory / f"classes-{key[:20]}.jsa"
        # JAVA_OPTS is split on blanks by the launcher: a path with one cannot be passed.
        self.usable = bool(java_path) and not any(c.isspace() for c in str(self.path))

    def use(self) -> str:
        """JVM options that map the archive if it exists ("" otherwise)."""
        if self.usable and self.path.is_file():
            return f"-XX:SharedArchiveFile={self.path} {_QUIET_CDS}"
        return ""

    def make(self) -> tuple[str, Path | None]:
        """JVM options for a run that writes the archive at exit when it does not exist yet;
        the file that run writes (pass it to `keep` after the run)."""
        if not self.usable or self.path.is_file():
            return self.use(), None
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        return f"-XX:ArchiveClassesAtExit={tmp} {_QUIET_CDS}", tmp

    def keep(self, tmp: Path | None, ok: bool) -> None:
        """Install the archive a successful run wrote; drop anything else."""
        if tmp is None:
            return
        try:
            if ok and tmp.is_file():
                os.replace(tmp, self.path)
        except OSError:
            pass
        finally:
            tmp.unlink(missing_ok=True)


@dataclass
class Outcome:
    returncode: int
    tail: list[str] = field(default_factory=list)  # last lines of stdout+stderr, sanitized


class Masker:
    """Replaces host paths (search path roots, scratch dirs) with names a client may see."""

    def __init__(self, replacements: Sequence[tuple[str, str]]) -> None:
        # Longest first, so a nested path wins over its parent.
        self.pairs = sorted(((a, b) for a, b in replacements if a), key=lambda p: -len(p[0]))

    def __call__(self, text: str) -> str:
        for a, b in self.pairs:
            text = text.replace(a + "/", b).replace(a, b.rstrip("/") or ".")
        return text


async def run_liquibase(
    argv: Sequence[str],
    *,
    cwd: Path,
    java_opts: str = "",
    on_line: Callable[[str], None],
    masker: Masker,
    started: Callable[[asyncio.subprocess.Process], None] | None = None,
) -> Outcome:
    """Run Liquibase to completion, every output line to `on_line` (masked); bounded in time."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),  # no ~/.liquibase or user defaults
        "LANG": "C.UTF-8",
        "JAVA_OPTS": java_opts,
        "LIQUIBASE_SHOW_BANNER": "false",
    }
    if "JAVA_HOME" in os.environ:
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    proc = await asyncio.create_subprocess_exec(
        *dies_with_parent(argv),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    if started is not None:
        started(proc)
    tail: list[str] = []

    async def pump(stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            line = masker(raw.decode(errors="replace").rstrip())
            if not line:
                continue
            tail.append(line)
            del tail[:-TAIL_LINES]
            on_line(line)

    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            await asyncio.gather(pump(proc.stdout), pump(proc.stderr))
            rc = await proc.wait()
    except BaseException:
        kill(proc)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await proc.wait()
        raise
    return Outcome(rc, tail)


def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the launcher and the JVM under it (its own process group)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)


_NOISE = re.compile(
    r"^(Starting Liquibase at|Liquibase Version:|Liquibase Open Source|For more information,"
    r"|For detailed help|Liquibase command .* was executed|Running Changeset:|UPDATE SUMMARY"
    r"|Output saved to|Run:|Previously run:|Filtered out:|Total change sets:|-{5,}"
    r"|WARNING: Liquibase)"
)


def error_text(tail: Sequence[str], returncode: int) -> tuple[str, str | None]:
    """(message, detail) from Liquibase's output: the 'Unexpected error' block, else the end."""
    lines = [line for line in tail if not _NOISE.match(line.strip())]
    if returncode < 0 or returncode > 128:
        sig = -returncode if returncode < 0 else returncode - 128
        last = [x for x in tail if x.strip()][-3:]
        return (
            f"Liquibase crashed (killed by signal {sig})"
            + (f" after: {_shorten(' | '.join(last), 300)}" if last else ""),
            "\n".join(tail[-20:]) or None,
        )
    for i, line in enumerate(lines):
        if "Unexpected error running Liquibase:" in line:
            block = [line.split("Unexpected error running Liquibase:", 1)[1].strip()]
            block += [x.strip() for x in lines[i + 1 : i + 12] if x.strip()]
            msg = " ".join(x for x in block if x)
            return _shorten(msg), "\n".join(lines[-20:]) or None
    errors = [x.strip() for x in lines if x.lstrip().startswith(("ERROR", "Caused by"))]
    if errors:
        return _shorten(" ".join(errors[-3:])), "\n".join(lines[-20:]) or None
    if lines:
        return _shorten(lines[-1].strip()), "\n".join(lines[-20:])
    return f"Liquibase exited with status {returncode} and no output", None


def _shorten(text: str, limit: int = 900) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
