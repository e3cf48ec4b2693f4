"""The Taidon local surface: init, config, status, ls, rm, logs."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import click
import yaml

from taidon_proxy.cli import render
from taidon_proxy.cli.admin import print_events, remove, show_status
from taidon_proxy.cli.client import load
from taidon_proxy.cli.context import as_json, client, config_path, json_option
from taidon_proxy.cli.discovered import config_text, echo_found
from taidon_proxy.cli.errors import EXIT_CONFIG, EXIT_CONFLICT, EXIT_NOT_FOUND, CliError
from taidon_proxy.config_load import parse_config
from taidon_proxy.config_profiles import redact_file_values
from taidon_proxy.discovery import discover
from taidon_proxy.errors import ConfigError

POSTGRES_USER = "postgres"


def unreachable_dir(path: Path) -> Path | None:
    """The first directory on the path that the servers' OS user could not traverse (as root)."""
    if os.geteuid() != 0:
        return None
    for d in [*reversed(path.parents), path]:
        if d.exists() and not d.stat().st_mode & stat.S_IXOTH:
            return d
    return None


@click.command()
@click.option(
    "--store",
    default=".taidon/store",
    show_default=True,
    help="Where states and metadata live (relative to the config file).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing config file.")
@json_option
@click.pass_context
def init(ctx: click.Context, store: str, force: bool) -> None:
    """Write a starter taidon.yaml and store, with the best snapshot backend for it, and the
    migrations found in the config's directory (Liquibase, Flyway, Supabase, plain SQL).

    Example: sqlrs init --store /var/lib/taidon/shop
    """
    from snapshots.registry import detect

    path = config_path(ctx)
    if path.exists() and not force:
        raise CliError(f"{path} exists", EXIT_CONFLICT, hint="pass --force to overwrite it")
    store_path = Path(store).expanduser()
    if not store_path.is_absolute():
        store_path = path.resolve().parent / store_path
    store_path.mkdir(parents=True, exist_ok=True)
    try:
        backend, reason = detect(store_path / "data")
    except OSError as e:
        raise CliError(f"cannot probe {store_path}: {e.strerror}", EXIT_CONFIG) from None
    found = discover(path.resolve().parent)
    text = config_text(found, store=store, backend=backend, reason=reason)
    parse_config(text, source=path)  # what we write must load
    path.write_text(text)
    blocked = unreachable_dir(store_path)
    out: dict[str, Any] = {
        "config": str(path),
        "store": str(store_path),
        "backend": backend,
        "reason": reason,
        "warning": None,
        "found": [
            {"layout": c.layout, "why": c.why, "alias": found.alias, "prepare": c.prepare}
            for c in found.candidates
        ],
    }
    if blocked is not None:
        out["warning"] = (
            f"{blocked} is not traversable by the {POSTGRES_USER} OS user that runs"
            " the servers; use a store under /var/lib or /srv, or chmod o+x it"
        )
    if as_json(ctx):
        render.emit_json(out)
        return
    click.echo(f"wrote {path}")
    click.echo(f"store {store_path}")
    click.echo(f"snapshot backend: {backend} ({reason})")
    echo_found(found)
    if out["warning"]:
        click.echo(f"warning: {out['warning']}", err=True)
    if len(found.candidates) == 1:
        click.echo(f"next: sqlrs --config {path} serve, then connect to database {found.alias}")
    elif found.candidates:
        click.echo(f"next: {len(found.candidates)} layouts found; keep one in {path}", err=True)
    else:
        click.echo(f"next: add a recipe under databases:, then run: sqlrs --config {path} serve")


@click.group()
def config() -> None:
    """Read and change the config file (the one `sqlrs serve` reads).

    \b
    Example:
      sqlrs config set instances.idle_ttl 30m
    """


def _lookup(data: Any, key: str) -> Any:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CliError(f"no setting {key}", EXIT_NOT_FOUND)
        node = node[part]
    return node


@config.command()
@json_option
@click.pass_context
def show(ctx: click.Context) -> None:
    """The effective configuration: defaults filled in, paths resolved.

    Example: sqlrs config show
    """
    cfg = load(config_path(ctx))
    data = redact_file_values(cfg.model_dump(mode="json"), cfg.file_values)
    if as_json(ctx):
        render.emit_json(data)
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@config.command()
@click.argument("key")
@json_option
@click.pass_context
def get(ctx: click.Context, key: str) -> None:
    """One effective setting by dotted key.

    Example: sqlrs config get cache.max_size
    """
    cfg = load(config_path(ctx))
    value = _lookup(redact_file_values(cfg.model_dump(mode="json"), cfg.file_values), key)
    if as_json(ctx):
        render.emit_json(value)
    elif isinstance(value, dict | list):
        click.echo(yaml.safe_dump(value, sort_keys=False).rstrip())
    else:
        click.echo(value)


@config.command(name="set")
@click.argument("key")
@click.argument("value")
@click.pass_context
def set_(ctx: click.Context, key: str, value: str) -> None:
    """Set a dotted key in the file (VALUE is YAML); the result must validate.

    Comments and the rest of the file stay as they are. A running proxy picks the change
    up with `sqlrs admin reload` (or SIGHUP).

    Example: sqlrs config set admin.listen 127.0.0.1:56433
    """
    from taidon_proxy.cli.yaml_edit import EditError, set_key, write_atomically

    path = config_path(ctx)
    load(path, check=False)  # a file that names a missing SQL file can still be fixed here
    try:
        text = set_key(path.read_text(encoding="utf-8"), key, value)
    except EditError as e:
        raise CliError(f"{path}: {e}", EXIT_CONFIG) from None
    try:
        parse_config(text, source=path)
    except ConfigError as e:
        raise CliError(e.message, EXIT_CONFIG, hint="the file was not changed") from None
    write_atomically(path, text)
    click.echo(f"{key} = {value}")
    click.echo("a running proxy picks this up with: sqlrs admin reload", err=True)


@click.command()
@json_option
@click.pass_context
def status(ctx: click.Context) -> None:
    """Is the proxy running, where, on which backend, and how full is the cache.

    Example: sqlrs status
    """
    c = client(ctx)
    st = c.get("/v1/status")
    if as_json(ctx):
        render.emit_json({**st, "aliases": c.get("/v1/aliases")})
        return
    show_status(ctx, st)


LS_WHAT = ("all", "aliases", "states", "instances", "jobs")


@click.command(name="ls")
@click.argument("what", type=click.Choice(LS_WHAT), default="all")
@click.argument("prefix", required=False)
@click.option("--tree", is_flag=True, help="States as a tree.")
@json_option
@click.pass_context
def ls(ctx: click.Context, what: str, prefix: str | None, tree: bool) -> None:
    """List aliases, states, instances and jobs (PREFIX filters ids).

    Example: sqlrs ls states 3f2a
    """
    c = client(ctx)
    kinds = LS_WHAT[1:] if what == "all" else (what,)
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        rows = c.get(f"/v1/{kind}")
        key = "alias" if kind == "aliases" else "id"
        if prefix:
            rows = [
                r for r in rows if str(r[key]).startswith(prefix) or prefix in r.get("names", [])
            ]
        out[kind] = rows
    if as_json(ctx):
        render.emit_json(out if what == "all" else out[what])
        return
    show = {
        "aliases": render.aliases_table,
        "states": render.states_table,
        "instances": render.instances_table,
        "jobs": render.jobs_table,
    }
    if tree:
        show["states"] = render.state_tree
    for kind, rows in out.items():
        if rows or what != "all":
            show[kind](rows)


@click.command(name="rm")
@click.argument("ref", metavar="ID")
@click.option("--force", is_flag=True, help="Remove even what is in use (stops its instances).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@json_option
@click.pass_context
def rm(ctx: click.Context, ref: str, force: bool, dry_run: bool) -> None:
    """Remove a state (name or id prefix, with its descendants) or stop an instance.

    Refuses what is in use (running instances, pins, descendants) unless --force.

    Example: sqlrs rm 3f2a9c --dry-run
    """
    remove(ctx, ref, force, dry_run)


@click.command()
@click.argument("job", required=False, default="")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@json_option
@click.pass_context
def logs(ctx: click.Context, job: str, follow: bool) -> None:
    """Events of a prepare job (default: the latest); --json prints NDJSON.

    Example: sqlrs logs --follow
    """
    print_events(ctx, job, follow)
