"""What a Liquibase recipe reads: every file under its search path (the fingerprint's inputs)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from taidon_proxy.config import LiquibasePrepare
from taidon_proxy.errors import BuildFailed

MAX_INPUT_FILES = 20000
# Never changelog sources; skipping them keeps the per-connection stat pass short.
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", ".tools"})


def collect_inputs(prep: LiquibasePrepare) -> list[str]:
    """Every file under the search path(s): a superset of what the changelog includes."""
    found: set[str] = set()
    for root in prep.search_path:
        if root.is_file():
            found.add(str(root))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in filenames:
                found.add(os.path.join(dirpath, name))
            if len(found) > MAX_INPUT_FILES:
                raise BuildFailed(
                    f"the search path holds more than {MAX_INPUT_FILES} files",
                    hint="point search_path at the folder that holds the changelogs",
                )
    return sorted(found)


def find_changelog(prep: LiquibasePrepare) -> Path:
    """The changelog file, looked up in the search path as Liquibase does; missing fails early."""
    for root in prep.search_path:
        p = root / prep.changelog
        if p.is_file():
            return p
    roots = ", ".join(p.name or str(p) for p in prep.search_path)
    raise BuildFailed(
        f"changelog {prep.changelog} not found in the search path ({roots})",
        hint="the changelog path is relative to search_path, as with liquibase --search-path",
    )


def changeset_file(prep: LiquibasePrepare, filename: str) -> Path | None:
    """A changeset's file (its name as databasechangelog records it) in the search path."""
    for root in prep.search_path:
        p = (root / filename) if root.is_dir() else None
        if p is not None and p.is_file():
            return p
    return None


def liquibase_version(launcher: Path) -> str | None:
    """Liquibase's version from its distribution's liquibase-core.jar manifest (no JVM)."""
    home = launcher.resolve().parent
    for jar in (home / "internal" / "lib" / "liquibase-core.jar", home / "liquibase-core.jar"):
        try:
            with zipfile.ZipFile(jar) as z:
                manifest = z.read("META-INF/MANIFEST.MF").decode(errors="replace")
        except (OSError, KeyError, zipfile.BadZipFile):
            continue
        for line in manifest.splitlines():
            name, _, value = line.partition(":")
            if name in ("Liquibase-Version", "Bundle-Version", "Implementation-Version"):
                return value.strip()
    return None
