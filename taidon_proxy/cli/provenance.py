"""`sqlrs provenance STATE`: every input that made a state, as a tree (or `--json`)."""

from __future__ import annotations

from typing import Any

import click

from taidon_proxy.cli import render
from taidon_proxy.cli.context import as_json, client, json_option

# A record's fields shown on the step's own line, in this order, when present.
_INLINE = ("tool", "tool_version", "source", "ref", "commit", "revision", "contexts",
           "labels", "settings", "database", "roles")  # fmt: skip
_SKIP = {"alias", "recipe_kind", "files", "file", "changeset", "tree", "engine", "initdb_settings",
         "backend", "variables", "parameters", "env", "x", "argv", "migrations",
         *_INLINE}  # fmt: skip


def _values(record: dict[str, Any], key: str) -> list[str]:
    v = record.get(key)
    if isinstance(v, dict):
        return [f"{k} = {h}" for k, h in v.items()]
    if isinstance(v, list):
        return [str(x) for x in v]
    return []


def _lines(record: dict[str, Any]) -> list[str]:
    out = []
    cs = record.get("changeset")
    if cs:
        out.append(f"changeset {cs['id']} by {cs['author']} in {cs['filename']}"
                   f" (checksum {cs['checksum']})")  # fmt: skip
    for f in record.get("files") or []:
        if f.get("missing"):
            out.append(f"file {f['path']}: gone when recorded")
            continue
        at = f" @ {f['commit'][:12]}" if f.get("commit") else ""
        out.append(f"file {f['path']}  blob {f['blob'][:12]}  sha256 {f['sha256'][:16]}…{at}")
    for key, noun in (("variables", "variable"), ("parameters", "parameter"), ("env", "env"),
                      ("x", "-x"), ("argv", "argv"), ("migrations", "migration")):  # fmt: skip
        out += [f"{noun} {v}" for v in _values(record, key)]
    out += [f"{k}: {v}" for k, v in record.items() if k not in _SKIP]
    return out


def _show(data: dict[str, Any]) -> None:
    complete = "" if data["complete"] else "  (incomplete: some states have no record)"
    click.echo(f"state {data['state']}  ({data['alias'] or 'no alias'}){complete}")
    eng = data.get("engine") or {}
    if eng:
        click.echo(f"  engine: Postgres {eng.get('version')} ({eng.get('source')},"
                   f" {eng.get('binaries')})")  # fmt: skip
    if data.get("initdb_settings"):
        settings = ", ".join(f"{k}={v}" for k, v in data["initdb_settings"].items())
        click.echo(f"  initdb: {settings}")
    click.echo(f"  backend: {data['backend']}"
               + (f" (built on {data['built_on']})" if data.get("built_on") not in
                  (None, data["backend"]) else ""))  # fmt: skip
    steps = data["steps"]
    for i, s in enumerate(steps):
        last = i == len(steps) - 1
        branch, cont = ("└─ ", "   ") if last else ("├─ ", "│  ")
        rec = s["record"]
        head = f"{render.short(s['state'])} {s['kind']} {s['label']}"
        if rec is None:
            click.echo(f"  {branch}{head}  (no record)")
            continue
        inline = [f"{k} {rec[k]}" for k in _INLINE if rec.get(k) not in (None, "", [])
                  and k not in ("commit",)]  # fmt: skip
        click.echo(f"  {branch}{head}" + (f"  [{'; '.join(inline)}]" if inline else ""))
        for line in _lines(rec):
            click.echo(f"  {cont}   {line}")


@click.command()
@click.argument("ref", metavar="STATE")
@json_option
@click.pass_context
def provenance(ctx: click.Context, ref: str) -> None:
    """Every input that made a state (name, id or unique prefix), its initdb root first.

    Per step: the recipe's files with their SHA-256 and git blob ids (and the commit, when
    built at a git ref), Liquibase changesets with their checksums, contexts and labels,
    parameters as hashes only, the tool and its version; for the chain: Postgres, the
    initdb settings and the backend.

    \b
    Example: sqlrs provenance $(sqlrs explain --key shop)
             sqlrs --json provenance 3f2a9c
    """
    data = client(ctx).get(f"/v1/states/{ref}/provenance")
    if as_json(ctx):
        render.emit_json(data)
    else:
        _show(data)
