"""What a config refers to, checked at load: SQL files, changelogs (parsed, includes), roles."""

from __future__ import annotations

import glob
import itertools
import json
import keyword
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.parsers import expat

import yaml

from taidon_proxy.config import (
    AlembicPrepare,
    CommandPrepare,
    Config,
    DjangoPrepare,
    LiquibasePrepare,
    PsqlPrepare,
    Recipe,
)
from taidon_proxy.config_errors import Problem

MAX_INCLUDE_DEPTH = 32
# Role names a recipe cannot create: the superuser exists already, the rest Postgres refuses.
RESERVED_ROLES = {"postgres", "public", "none", "current_user", "session_user", "current_role"}


def check(cfg: Config) -> list[Problem]:
    """Everything the config names that can be checked without running anything."""
    out: list[Problem] = []
    for alias, recipe in cfg.databases.items():
        key = ["databases", alias]
        out += _roles(key, recipe)
        prep = recipe.prepare
        if isinstance(prep, PsqlPrepare):
            for i, f in enumerate(prep.files):
                why = _unreadable_file(f)
                if why:
                    out.append(Problem([*key, "prepare", "files", str(i)], f"{f}: {why}"))
        elif isinstance(prep, LiquibasePrepare):
            out += _liquibase([*key, "prepare"], prep)
        elif isinstance(prep, CommandPrepare):
            out += _command([*key, "prepare"], prep, cfg)
        elif isinstance(prep, AlembicPrepare | DjangoPrepare):
            for name, path in prep:
                why = _unreadable_file(path) if isinstance(path, Path) else None
                if why:
                    out.append(Problem([*key, "prepare", name], f"{path}: {why}"))
            if isinstance(prep, DjangoPrepare):
                out += _django([*key, "prepare"], prep)
    for name in ("cert", "key"):
        p = getattr(cfg.tls, name)
        why = _unreadable_file(p) if p is not None else None
        if why:
            out.append(Problem(["tls", name], f"{p}: {why}"))
    pg_bin = cfg.runtime.postgres_bin
    if pg_bin is not None and not (pg_bin / "postgres").is_file():
        out.append(Problem(["runtime", "postgres_bin"], f"{pg_bin} has no postgres binary"))
    return out + _teams(cfg)


def _teams(cfg: Config) -> list[Problem]:
    """Teams name aliases that exist; every user given limits is a member of some team."""
    out: list[Problem] = []
    members: set[str] = set()
    for team, t in cfg.teams.items():
        members.update(t.members)
        for i, alias in enumerate(t.aliases):
            if alias != "*" and alias not in cfg.databases:
                known = ", ".join(sorted(cfg.databases)) or "none"
                out.append(
                    Problem(
                        ["teams", team, "aliases", str(i)],
                        f"no alias {alias!r} in databases (aliases: {known}; * for every one)",
                    )
                )
    mapped = set(cfg.oidc.groups.values()) if cfg.oidc is not None else set()
    for team, t in cfg.teams.items():
        if not t.members and team not in mapped:
            out.append(
                Problem(["teams", team, "members"], "no members, and no oidc.groups maps to it")
            )
    for user in cfg.users:
        if user not in members:
            out.append(Problem(["users", user], "is a member of no team (teams.*.members)"))
    if cfg.oidc is not None:
        if not cfg.teams:
            out.append(Problem(["oidc"], "needs teams: its groups map to teams"))
        for group, team in cfg.oidc.groups.items():
            if team not in cfg.teams:
                known = ", ".join(sorted(cfg.teams)) or "none"
                out.append(
                    Problem(
                        ["oidc", "groups", group], f"no team {team!r} in teams (teams: {known})"
                    )
                )
    if cfg.teams and cfg.auth.method == "trust":
        out.append(
            Problem(
                ["auth", "method"],
                "teams need scram-sha-256 or password: with trust anyone may claim any user",
            )
        )
    return out


def _django(key: list[str], prep: DjangoPrepare) -> list[Problem]:
    out = [
        Problem([*key, "pythonpath", str(i)], f"{d}: no such directory")
        for i, d in enumerate(prep.pythonpath)
        if not d.is_dir()
    ]
    if not _is_module_name(prep.settings):
        why = "is not a module name (dotted, like mysite.settings; not a file path)"
        out.append(Problem([*key, "settings"], f"{prep.settings!r} {why}"))
    return out


def _is_module_name(name: str) -> bool:
    return all(p.isidentifier() and not keyword.iskeyword(p) for p in name.split("."))


def _unreadable_file(path: Path) -> str | None:
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable"
    return None


def _roles(key: list[str], recipe: Recipe) -> list[Problem]:
    out = []
    seen: set[str] = set()
    for i, role in enumerate(recipe.roles):
        where = [*key, "roles", str(i)]
        if role.lower() in RESERVED_ROLES:
            why = "exists in every instance" if role.lower() == "postgres" else "is reserved"
            out.append(Problem(where, f"role {role!r} {why}; use another name"))
        elif role.lower().startswith("pg_"):
            out.append(Problem(where, f"role {role!r}: names starting pg_ are reserved"))
        elif role in seen:
            out.append(Problem(where, f"role {role!r} is listed twice"))
        seen.add(role)
    return out


# --- Liquibase --------------------------------------------------------------------------------


def _liquibase(key: list[str], prep: LiquibasePrepare) -> list[Problem]:
    out = []
    roots = []
    for i, root in enumerate(prep.search_path):
        if not root.is_dir():
            why = "no such directory" if not root.exists() else "not a directory"
            out.append(Problem([*key, "search_path", str(i)], f"{root}: {why}"))
        else:
            roots.append(root)
    if not roots:
        return out
    changelog = _find(prep.changelog, roots)
    if changelog is None:
        where = ", ".join(str(r) for r in roots)
        out.append(
            Problem(
                [*key, "changelog"],
                f"{prep.changelog} is not in the search path ({where}); the changelog is"
                " relative to search_path, as with liquibase --search-path",
            )
        )
        return out
    for msg in _walk(changelog, roots, set(), 0):
        out.append(Problem([*key, "changelog"], msg))
    return out


def _find(name: str, roots: list[Path], base: Path | None = None) -> Path | None:
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for d in ([base] if base is not None else []) + roots:
        if (d / p).is_file():
            return d / p
    return None


def _show(path: Path, roots: list[Path]) -> str:
    for r in roots:
        if path.is_relative_to(r):
            return str(path.relative_to(r))
    return str(path)


def _walk(path: Path, roots: list[Path], seen: set[Path], depth: int) -> Iterator[str]:
    """Problems of one changelog (parse errors, includes not found), then of its includes."""
    if path in seen or depth > MAX_INCLUDE_DEPTH:
        return
    seen.add(path)
    shown = _show(path, roots)
    suffix = path.suffix.lower()
    try:
        data = path.read_bytes()
    except OSError as e:
        yield f"{shown}: cannot read: {e.strerror}"
        return
    if suffix == ".xml":
        includes, error = _xml_includes(data)
    elif suffix in (".yaml", ".yml", ".json"):
        includes, error = _structured_includes(data, json_=suffix == ".json")
    else:  # formatted SQL (or another format Liquibase reads): found is all we check
        return
    if error is not None:
        yield f"{shown}:{error}"
        return
    for line, attrs in includes:
        target = attrs.get("file") or attrs.get("path")
        if not target or "${" in target:
            continue  # changelog parameters are substituted by Liquibase
        relative = str(attrs.get("relativeToChangelogFile", "false")).lower() == "true"
        base = path.parent if relative else None
        where = f"{shown}:{line}: " if line else f"{shown}: "
        if "file" in attrs:
            found = _find(target, [] if relative else roots, base)
            if found is None:
                yield f"{where}included file {target} not found"
            elif found.suffix.lower() in (".xml", ".yaml", ".yml", ".json"):
                yield from _walk(found, roots, seen, depth + 1)
        else:
            dirs = [base / target] if base else [r / target for r in roots]
            if not any(d.is_dir() for d in dirs):
                yield f"{where}includeAll path {target} not found"


def _xml_includes(data: bytes) -> tuple[list[tuple[int, dict[str, str]]], str | None]:
    found: list[tuple[int, dict[str, str]]] = []
    parser = expat.ParserCreate()

    def start(name: str, attrs: dict[str, str]) -> None:
        local = name.rsplit(":", 1)[-1]
        if local in ("include", "includeAll"):
            found.append((parser.CurrentLineNumber, dict(attrs)))

    parser.StartElementHandler = start
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        return found, f"{e.lineno}: not well-formed XML: {expat.errors.messages[e.code]}"
    return found, None


def _structured_includes(
    data: bytes, *, json_: bool
) -> tuple[list[tuple[int, dict[str, str]]], str | None]:
    try:
        doc: Any = json.loads(data) if json_ else yaml.safe_load(data)
    except json.JSONDecodeError as e:
        return [], f"{e.lineno}: not valid JSON: {e.msg}"
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else "?"
        return [], f"{line}: not valid YAML: {getattr(e, 'problem', e)}"
    entries = doc.get("databaseChangeLog") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return [], " no databaseChangeLog list at the top level"
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        for tag in ("include", "includeAll"):
            attrs = entry.get(tag)
            if isinstance(attrs, dict):
                out.append((0, {k: str(v) for k, v in attrs.items()}))
    return out, None


# --- command ----------------------------------------------------------------------------------


def _command(key: list[str], prep: CommandPrepare, cfg: Config) -> list[Problem]:
    base = cfg.source.parent if cfg.source else Path.cwd()
    return [
        Problem([*key, "inputs", str(i)], f"{pat!r} matches no file")
        for i, pat in enumerate(prep.inputs)
        if not expand_globs([pat], base)
    ]


def expand_globs(patterns: list[str], base: Path) -> list[Path]:
    """Every regular file the globs match (`**` recursive), relative to base, sorted, unique."""
    out: set[Path] = set()
    for pat in patterns:
        full = pat if os.path.isabs(pat) else str(base / pat)
        out.update(Path(m) for m in glob.glob(full, recursive=True) if Path(m).is_file())
    return sorted(out)


def glob_dirs(patterns: list[str], base: Path) -> list[Path]:
    """The directories the globs search (a superset): adding a matching file changes one."""
    out: set[Path] = set()
    for pat in patterns:
        parts = Path(pat if os.path.isabs(pat) else str(base / pat)).parts
        fixed = [p for p in itertools.takewhile(lambda p: not glob.has_magic(p), parts)]
        root = Path(*fixed) if fixed else base
        if len(fixed) == len(parts) or not root.is_dir():
            continue  # a plain path: the file itself is the input
        out.add(root)
        if len(parts) - len(fixed) > 1:  # the match can be deeper than the root
            out.update(Path(d) for d, _, _ in os.walk(root))
    return sorted(out)
