"""Zero-config discovery: which migrations a repository holds, by the layouts people use.

Each layout is a small probe that looks at fixed places (no search of the whole tree) and
answers with a recipe and the reason it matched. Two matches are reported, never guessed.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taidon_proxy.errors import ConfigError

LIQUIBASE_SUFFIXES = (".xml", ".yaml", ".yml", ".json", ".sql")
# Flyway: V<version>__<description>.sql, version parts split by "." or "_" (V1_1 is 1.1);
# R__<description>.sql are repeatable and run after every versioned one, by description.
_FLYWAY_V = re.compile(r"^V(\d+(?:[._]\d+)*)__(.+)\.sql$")
_FLYWAY_R = re.compile(r"^R__(.+)\.sql$")
_LEADING_NUMBER = re.compile(r"^(\d+)")
_ALIAS_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Candidate:
    layout: str  # a name people know the layout by
    why: str  # what was found, in a sentence
    prepare: dict[str, Any]  # the recipe's prepare block, paths relative to the root


@dataclass(frozen=True)
class Discovery:
    root: Path
    alias: str
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # files seen and left out, and why

    def choose(self) -> Candidate:
        """The one candidate, or a ConfigError that names what was (or was not) found."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        if not self.candidates:
            raise ConfigError(
                f"no taidon.yaml and no migrations found in {self.root}",
                hint="looked for: " + "; ".join(LAYOUT_PLACES)
                + ". Write a config with: sqlrs init",
            )  # fmt: skip
        found = "; ".join(f"{c.layout}: {c.why}" for c in self.candidates)
        raise ConfigError(
            f"no taidon.yaml and {len(self.candidates)} candidate migration layouts in"
            f" {self.root}: {found}",
            hint="pick one: sqlrs init writes them all, commented out but the first",
        )


def discover(root: Path) -> Discovery:
    root = root.resolve()
    notes: list[str] = []
    found = [c for probe in PROBES for c in probe(root, notes)]
    return Discovery(root, alias_for(root), found, notes)


def alias_for(root: Path) -> str:
    """The repository's name (its top level when root is inside a git work tree)."""
    top = root
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            top = Path(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    name = _ALIAS_BAD.sub("-", top.name).strip("-.") or "db"
    return name if name[0].isalpha() or name[0] == "_" else f"db-{name}"[:63]


# --- the layouts ------------------------------------------------------------------------------


def _liquibase(root: Path, _notes: list[str]) -> list[Candidate]:
    out = []
    places = [
        ("Spring Boot Liquibase", "src/main/resources", "db/changelog", "db.changelog-master"),
        ("JHipster Liquibase", "src/main/resources", "config/liquibase", "master"),
        ("Liquibase", ".", "db/changelog", "*master*"),
    ]
    seen: set[Path] = set()
    for layout, search, folder, stem in places:
        d = root / search / folder
        if not d.is_dir():
            continue
        masters = sorted(
            f for f in d.iterdir()
            if f.is_file() and f.suffix in LIQUIBASE_SUFFIXES and f not in seen
            and (f.stem == stem if "*" not in stem else "master" in f.stem)
        )  # fmt: skip
        for f in masters:
            seen.add(f)
            rel = f.relative_to(root / search).as_posix()
            out.append(
                Candidate(
                    layout,
                    f"changelog {(Path(search) / rel).as_posix()}",
                    {"kind": "lb", "search_path": [search], "changelog": rel},
                )
            )
    return out


def _flyway(root: Path, notes: list[str]) -> list[Candidate]:
    out = []
    for folder in ("db/migration", "src/main/resources/db/migration"):
        d = root / folder
        if not d.is_dir():
            continue
        versioned: dict[tuple[int, ...], Path] = {}
        repeatable: list[tuple[str, Path]] = []
        for f in sorted(d.iterdir()):
            if not f.is_file() or f.suffix != ".sql":
                continue
            if m := _FLYWAY_V.match(f.name):
                version = _version(m.group(1))
                if version in versioned:
                    raise ConfigError(
                        f"{folder}: two migrations with version"
                        f" {'.'.join(map(str, version))}: {versioned[version].name}, {f.name}"
                    )
                versioned[version] = f
            elif m := _FLYWAY_R.match(f.name):
                repeatable.append((m.group(1), f))
            else:
                notes.append(f"{folder}/{f.name}: not V<version>__<name>.sql or R__<name>.sql")
        if not versioned:
            continue
        files = [versioned[v] for v in sorted(versioned)] + [f for _, f in sorted(repeatable)]
        out.append(
            Candidate(
                "Flyway-style versioned SQL",
                f"{len(versioned)} versioned"
                + (f" and {len(repeatable)} repeatable" if repeatable else "")
                + f" migrations in {folder}, in version order",
                {"kind": "psql", "files": [f.relative_to(root).as_posix() for f in files]},
            )
        )
    return out


def _version(text: str) -> tuple[int, ...]:
    """As Flyway compares versions: numerically, part by part, 1.0 the same as 1."""
    parts = [int(x) for x in re.split(r"[._]", text)]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _supabase(root: Path, _notes: list[str]) -> list[Candidate]:
    d = root / "supabase" / "migrations"
    migrations = sorted(d.glob("*.sql")) if d.is_dir() else []
    if not migrations:
        return []
    seed = root / "supabase" / "seed.sql"
    files = migrations + ([seed] if seed.is_file() else [])
    return [
        Candidate(
            "Supabase",
            f"{len(migrations)} migrations in supabase/migrations"
            + (" and supabase/seed.sql" if seed.is_file() else ""),
            {"kind": "psql", "files": [f.relative_to(root).as_posix() for f in files]},
        )
    ]


def _numbered(f: Path) -> tuple[int, str]:
    """001_x before 2_y before 10_z: a leading number orders by value, then the name."""
    m = _LEADING_NUMBER.match(f.name)
    return (int(m.group(1)) if m else -1, f.name)


def _plain(root: Path, _notes: list[str]) -> list[Candidate]:
    out = []
    d = root / "migrations"
    migrations = sorted(d.glob("*.sql"), key=_numbered) if d.is_dir() else []
    seed = root / "seed.sql"
    if migrations:
        files = migrations + ([seed] if seed.is_file() else [])
        out.append(
            Candidate(
                "plain SQL migrations",
                f"{len(migrations)} files in migrations/ (numbered order)"
                + (" and seed.sql" if seed.is_file() else ""),
                {"kind": "psql", "files": [f.relative_to(root).as_posix() for f in files]},
            )
        )
    schema = root / "schema.sql"
    if schema.is_file():
        files = [schema] + ([seed] if seed.is_file() else [])
        out.append(
            Candidate(
                "schema and seed",
                "schema.sql" + (" and seed.sql" if seed.is_file() else ""),
                {"kind": "psql", "files": [f.relative_to(root).as_posix() for f in files]},
            )
        )
    return out


PROBES: list[Callable[[Path, list[str]], list[Candidate]]] = [
    _liquibase, _flyway, _supabase, _plain,
]  # fmt: skip
LAYOUT_PLACES = [
    "src/main/resources/db/changelog/db.changelog-master.*",
    "src/main/resources/config/liquibase/master.*",
    "db/changelog/*master*",
    "db/migration/V*__*.sql",
    "src/main/resources/db/migration/V*__*.sql",
    "supabase/migrations/*.sql",
    "migrations/*.sql",
    "schema.sql",
]
