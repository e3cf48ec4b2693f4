"""`sqlrs admin …`: the operator surface of a running proxy."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from taidon_proxy.cli import render
from taidon_proxy.cli.audit import audit
from taidon_proxy.cli.context import as_json, client, json_option
from taidon_proxy.cli.errors import (
    EXIT_CONFIG,
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CliError,
)

DRAIN_WAIT_POLL = 0.5
EXIT_WAIT = 30.0  # after the admin endpoint closed: instances stopping, the store settling
EXIT_POLL = 0.05
LOOPBACK_HOSTS = ("localhost", "::1", "")


@click.group()
def admin() -> None:
    """Operate a running proxy: status, connections, instances, states, jobs, reset, snapshot.

    \b
    Example:
      sqlrs admin instances
    """


def show_status(ctx: click.Context, st: dict[str, Any]) -> None:
    if as_json(ctx):
        render.emit_json(st)
        return
    c, cache = st["counts"], st["cache"]
    used = cache.get("used_bytes", 0)
    cap = cache.get("max_bytes", cache.get("max_size"))
    lines = [
        f"taidon proxy {st['version']}, up {render.duration(st['uptime_seconds'])}"
        + ("  (draining)" if st["draining"] else ""),
        f"listening  {', '.join(st['listeners']['proxy'])}"
        f"  (admin {', '.join(st['listeners']['admin'])})",
        f"backend    {st['backend']['name']}  ({st['backend']['reason']})",
        f"runtime    {st['runtime']['kind']}",
        f"store      {st['store']}",
        f"cache      {render.size(used)} of {render.size(cap)} in {c['states']} states",
        f"now        {c['instances']} instances, {c['connections']} connections,"
        f" {c['jobs_running']} builds running",
        f"aliases    {', '.join(st['aliases']) or '(none)'}",
    ]
    for line in lines:
        click.echo(line)


@admin.command()
@json_option
@click.pass_context
def status(ctx: click.Context) -> None:
    """Version, uptime, backend, runtime, listeners and cache usage.

    Example: sqlrs admin status --json
    """
    show_status(ctx, client(ctx).get("/v1/status"))


@admin.command()
@json_option
@click.pass_context
def connections(ctx: click.Context) -> None:
    """Open client connections: client address, user, alias, instance, bytes, age.

    Example: sqlrs admin connections
    """
    rows = client(ctx).get("/v1/connections")
    render.emit_json(rows) if as_json(ctx) else render.connections_table(rows)


@admin.command()
@json_option
@click.pass_context
def quotas(ctx: click.Context) -> None:
    """Quotas (teams): each user's and team's use against its limits.

    Instances at once, disk written by its instances (measured every few seconds), the
    lifetime and idle TTL ceilings, a team's builds running against its build limit (more
    wait in the build queue), and how many connections its quotas refused.

    Example: sqlrs admin quotas
    """
    q = client(ctx).get("/v1/quotas")
    if as_json(ctx):
        render.emit_json(q)
        return

    def limit(value: int | None, show: Callable[[int], str] = str) -> str:
        return "-" if value is None else show(value)

    rows = [
        [
            kind, name, str(v["instances"]["used"]), limit(v["instances"]["limit"]),
            *([str(v["builds"]["used"]), limit(v["builds"]["limit"])] if "builds" in v
              else ["", ""]),
            render.size(v["disk"]["used"]), limit(v["disk"]["limit"], render.size),
            render.duration(v["lifetime"]["limit"]), render.duration(v["idle_ttl"]["limit"]),
            str(v["refused"]),
        ]
        for kind in ("team", "user")
        for name, v in q[kind + "s"].items()
    ]  # fmt: skip
    head = ["FOR", "NAME", "INSTANCES", "LIMIT", "BUILDS", "LIMIT", "DISK", "DISK LIMIT"]
    render.table("quotas", [*head, "LIFETIME", "IDLE TTL", "REFUSED"], rows)


@admin.command()
@json_option
@click.pass_context
def instances(ctx: click.Context) -> None:
    """Instances: alias:label, isolation, state, status (running, stopped: a kept shared
    clone, spare), connections, age, idle time, how long a stopped clone is kept.

    Example: sqlrs admin instances
    """
    rows = client(ctx).get("/v1/instances")
    render.emit_json(rows) if as_json(ctx) else render.instances_table(rows)


@admin.command()
@click.option("--tree", is_flag=True, help="Show the states as a tree of parent links.")
@json_option
@click.pass_context
def states(ctx: click.Context, tree: bool) -> None:
    """Cached states: size, last use, use count, names, pins (a tree with --tree).

    Example: sqlrs admin states --tree
    """
    rows = client(ctx).get("/v1/states")
    if as_json(ctx):
        render.emit_json(rows)
    elif tree:
        render.state_tree(rows)
    else:
        render.states_table(rows)


@admin.command()
@json_option
@click.pass_context
def jobs(ctx: click.Context) -> None:
    """Recent prepare jobs with their status and steps; a queued one shows its position
    (`queued #0` starts next), team and priority.

    Example: sqlrs admin jobs
    """
    rows = client(ctx).get("/v1/jobs")
    render.emit_json(rows) if as_json(ctx) else render.jobs_table(rows)


def print_events(ctx: click.Context, job: str, follow: bool) -> None:
    c = client(ctx)
    job_id = c.get(f"/v1/jobs/{job}")["id"] if job else latest_job(c)
    for ev in c.stream("GET", f"/v1/jobs/{job_id}/events", follow=follow):
        click.echo(render.json_line(ev) if as_json(ctx) else render.event_line(ev))


def latest_job(c: Any) -> str:
    jobs = c.get("/v1/jobs")
    if not jobs:
        raise CliError("no prepare jobs yet", EXIT_NOT_FOUND)
    return str(jobs[0]["id"])


@admin.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@json_option
@click.pass_context
def logs(ctx: click.Context, job: str, follow: bool) -> None:
    """A prepare job's events (JOB is an id or unique prefix); --json prints NDJSON.

    Example: sqlrs admin logs j-3f2a --follow
    """
    print_events(ctx, job, follow)


@admin.command()
@click.argument("target", metavar="ALIAS[@REF][:LABEL]")
@json_option
@click.pass_context
def reset(ctx: click.Context, target: str) -> None:
    """End a shared instance's sessions (57P01); the next connection gets a fresh clone.

    Example: sqlrs admin reset shop:ci-42 (a git ref's instance: sqlrs admin reset shop@main:ci)
    """
    head, _, label = target.partition(":")
    alias, at, ref = head.partition("@")
    body: dict[str, str] = {"label": label or "default", **({"ref": ref} if at else {})}
    out = client(ctx).call("POST", f"/v1/aliases/{alias}/reset", body)
    if as_json(ctx):
        render.emit_json(out)
    else:
        inst = out["instance"] or {}
        click.echo(
            f"reset {out['reset']} (instance {inst.get('id', '?')},"
            f" {inst.get('connections', 0)} sessions ended)"
        )


@admin.command()
@click.argument("target", metavar="INSTANCE|ALIAS[:LABEL]")
@click.option("--name", required=True, help="Name of the new state (open it as state:NAME).")
@json_option
@click.pass_context
def snapshot(ctx: click.Context, target: str, name: str) -> None:
    """Turn a live instance into a named state (paused briefly, not stopped).

    Example: sqlrs admin snapshot shop:ci-42 --name before-migration
    """
    out = client(ctx).call("POST", "/v1/snapshots", {"instance": target, "name": name})
    if as_json(ctx):
        render.emit_json(out)
    else:
        click.echo(
            f"state {render.short(out['id'])} named {name}; connect with database state:{name}"
        )


def _pin(ctx: click.Context, state: str, pinned: bool) -> None:
    method = "POST" if pinned else "DELETE"
    out = client(ctx).call(method, f"/v1/states/{state}/pin")
    if as_json(ctx):
        render.emit_json(out)
    else:
        click.echo(f"{'pinned' if pinned else 'unpinned'} {render.short(out['id'])}")


@admin.command()
@click.argument("state")
@json_option
@click.pass_context
def pin(ctx: click.Context, state: str) -> None:
    """Keep a state from eviction (STATE is a name or an id prefix).

    Example: sqlrs admin pin before-migration
    """
    _pin(ctx, state, True)


@admin.command()
@click.argument("state")
@json_option
@click.pass_context
def unpin(ctx: click.Context, state: str) -> None:
    """Let a pinned state be evicted again.

    Example: sqlrs admin unpin before-migration
    """
    _pin(ctx, state, False)


def remove(ctx: click.Context, ref: str, force: bool, dry_run: bool) -> None:
    """A state (name or id prefix) or an instance (id, prefix or ALIAS[:LABEL])."""
    c = client(ctx)
    kind, found = resolve_any(c, ref)
    if kind == "state":
        out = c.call("DELETE", f"/v1/states/{found['id']}", force=force, dry_run=dry_run)
        if as_json(ctx):
            render.emit_json(out)
            return
        verb = "would remove" if dry_run else "removed"
        click.echo(
            f"{verb} {len(out['states'])} state(s), {render.size(out['bytes'])}:"
            f" {', '.join(render.short(s) for s in out['states'])}"
        )
        if out["instances"]:
            click.echo(
                f"{'would stop' if dry_run else 'stopped'} instances: {', '.join(out['instances'])}"
            )
        if dry_run and out["blockers"]:
            click.echo("needs --force: " + "; ".join(out["blockers"]))
        return
    if found["connections"] and not force and not dry_run:
        raise CliError(
            f"instance {found['id']} has {found['connections']} open connection(s)",
            EXIT_CONFLICT,
            hint="pass --force to stop it anyway (its clients get 57P01)",
        )
    if dry_run:
        out = {"dry_run": True, "instance": found}
    else:
        out = c.call("DELETE", f"/v1/instances/{found['id']}")
    if as_json(ctx):
        render.emit_json(out)
    else:
        click.echo(f"{'would stop' if dry_run else 'stopped'} instance {found['id']}")


def resolve_any(c: Any, ref: str) -> tuple[str, dict[str, Any]]:
    """A state first (names and hex prefixes), else an instance; 404 when neither."""
    try:
        return "state", c.get(f"/v1/states/{ref}")
    except CliError as e:
        if e.exit_code != EXIT_NOT_FOUND:
            raise
    try:
        return "instance", c.get(f"/v1/instances/{ref}")
    except CliError as e:
        if e.exit_code == EXIT_NOT_FOUND:
            raise CliError(
                f'no state or instance "{ref}"', EXIT_NOT_FOUND, hint="list them with: sqlrs ls"
            ) from None
        raise


@admin.command(name="rm")
@click.argument("ref", metavar="ID")
@click.option("--force", is_flag=True, help="Remove even what is in use (stops its instances).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@json_option
@click.pass_context
def rm_(ctx: click.Context, ref: str, force: bool, dry_run: bool) -> None:
    """Remove a state (and its descendants) or stop an instance.

    Example: sqlrs admin rm 3f2a9c --dry-run
    """
    remove(ctx, ref, force, dry_run)


@admin.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be evicted.")
@json_option
@click.pass_context
def gc(ctx: click.Context, dry_run: bool) -> None:
    """Evict unused states down to the cache's low-water mark.

    Example: sqlrs admin gc --dry-run
    """
    out = client(ctx).call("POST", "/v1/cache/gc", {"dry_run": dry_run})
    if as_json(ctx):
        render.emit_json(out)
        return
    evicted = out["evicted"]
    verb = "would evict" if dry_run else "evicted"
    freed = sum(int(e.get("size_bytes", 0)) for e in evicted)
    click.echo(f"{verb} {len(evicted)} state(s), {render.size(freed)}")
    for e in evicted:
        click.echo(f"  {render.short(e.get('id'))}  {e.get('alias') or '-'}  {e.get('label', '')}")


def _plain(value: Any) -> str:
    return (
        "null"
        if value is None
        else json.dumps(value)
        if isinstance(value, dict | list)
        else str(value)
    )


@admin.command(name="reload")
@json_option
@click.pass_context
def reload_(ctx: click.Context) -> None:
    """Make the running proxy read its config file again (as SIGHUP does).

    A file with problems changes nothing (each problem is named with file:line). Sessions
    keep running. Says which aliases were added, removed or changed, and which keys keep
    their running value until a restart (listen, admin, store, snapshot, runtime, tls, auth).

    \b
    Example:
      sqlrs config set databases.x '{prepare: {kind: psql, files: [x.sql]}}'
      sqlrs admin reload
    """
    try:
        out = client(ctx).call("POST", "/v1/reload")
    except CliError as e:
        payload = e.payload or {}
        if payload.get("code") == "invalid_config":
            raise CliError(
                f"the config file has problems, so nothing changed:\n{payload['message']}",
                EXIT_CONFIG,
                hint="the running configuration is unchanged; fix the file and reload again",
                payload=payload,
            ) from None
        raise
    if as_json(ctx):
        render.emit_json(out)
        return
    aliases = out["aliases"]
    click.echo(f"reloaded {out['config']}")
    changed = False
    for what in ("added", "removed", "changed"):
        if aliases[what]:
            changed = True
            click.echo(f"aliases {what}: {', '.join(aliases[what])}")
    if out["applied"]:
        changed = True
        click.echo(f"applied now: {', '.join(out['applied'])}")
    for p in out["needs_restart"]:
        changed = True
        click.echo(
            f"needs restart: {p['key']} (running {_plain(p['running'])},"
            f" file says {_plain(p['configured'])})"
        )
    if not changed:
        click.echo("no changes")


@admin.command()
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    help="Seconds to let sessions finish before stopping anyway.",
)
@click.option("--no-wait", is_flag=True, help="Return once draining has started.")
@json_option
@click.pass_context
def drain(ctx: click.Context, timeout: float, no_wait: bool) -> None:
    """Stop accepting connections, let open sessions finish, then stop the proxy.

    Example: sqlrs admin drain --timeout 60
    """
    if timeout <= 0:
        raise CliError("--timeout must be positive", EXIT_USAGE)
    c = client(ctx)
    proc = local_process(c.get("/v1/status").get("pid"), c.config.admin.listen or "")
    out = c.call("POST", "/v1/drain", {"timeout": timeout})
    if not as_json(ctx):
        click.echo(f"draining: {out['sessions']} open session(s); new connections are refused")
    if not no_wait:
        deadline = time.monotonic() + timeout + 30
        while c.alive() and time.monotonic() < deadline:
            time.sleep(DRAIN_WAIT_POLL)
        # The admin endpoint closes first; the process is gone only once its instances are.
        out["stopped"] = False
        if c.alive():
            message = "the proxy is still running"
        elif proc is None:
            message = "the proxy is stopping (its admin endpoint is closed)"
        else:
            exit_deadline = time.monotonic() + EXIT_WAIT
            while proc.running() and time.monotonic() < exit_deadline:
                time.sleep(EXIT_POLL)
            out["stopped"] = not proc.running()
            out["pid"] = proc.pid
            message = (
                "the proxy stopped"
                if out["stopped"]
                else f"the proxy is stopping (pid {proc.pid} still running after {EXIT_WAIT:.0f}s)"
            )
        if not as_json(ctx):
            click.echo(message)
    if as_json(ctx):
        render.emit_json(out)


@dataclass(frozen=True)
class LocalProcess:
    """The proxy's process on this host, told apart from a later one with the same pid."""

    pid: int
    started: str

    def running(self) -> bool:
        return _start_time(self.pid) == self.started


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # Field 3 (state) is fields[0]; starttime is field 22. A zombie has exited.
    return None if not fields or fields[0] == "Z" else fields[19]


def local_process(pid: object, admin_listen: str) -> LocalProcess | None:
    """The proxy's process, when its admin address is on this host and its pid is known."""
    host = admin_listen.rpartition(":")[0].strip("[]")
    if not isinstance(pid, int) or (host not in LOOPBACK_HOSTS and not host.startswith("127.")):
        return None
    started = _start_time(pid)
    return LocalProcess(pid, started) if started is not None else None


admin.add_command(audit)
