"""`sqlrs plan:*`, `prepare:*` and `run:*`: build ahead, then run tools through the proxy."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.parse
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from taidon_proxy.cli import render
from taidon_proxy.cli.client import AdminClient
from taidon_proxy.cli.context import as_json, client, json_option
from taidon_proxy.cli.errors import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, CliError


def recipe_kind(c: AdminClient, alias: str, wanted: str | None) -> None:
    """An alias of the wrong kind is a usage error that names the right command.

    `wanted` None (`sqlrs prepare ALIAS`) takes any kind: the proxy knows the recipe.
    """
    if wanted is None:
        return
    recipe = c.config.databases.get(alias)
    if recipe is None:
        known = ", ".join(sorted(c.config.databases)) or "(none)"
        raise CliError(
            f'no recipe "{alias}" in {c.config_path}',
            EXIT_NOT_FOUND,
            hint=f"known aliases: {known}",
        )
    kind = recipe.prepare.kind
    if kind != wanted:
        raise CliError(
            f"{alias} is a {kind} recipe, not {wanted}",
            EXIT_USAGE,
            hint=f"use the :{kind} form of this command, or the plain one (any kind)",
        )


def _query(ref: str | None) -> dict[str, str]:
    return {"ref": ref} if ref is not None else {}


def database_name(alias: str, ref: str | None, label: str | None) -> str:
    """The database a client names: alias, alias:label, alias@ref, alias@ref:label."""
    head = f"{alias}@{ref}" if ref is not None else alias
    return f"{head}:{label}" if label else head


def do_plan(ctx: click.Context, alias: str, kind: str | None, ref: str | None = None) -> None:
    c = client(ctx)
    recipe_kind(c, alias, kind)
    out = c.get(f"/v1/aliases/{alias}/plan", **_query(ref))
    if as_json(ctx):
        render.emit_json(out)
        return
    steps = out["steps"]
    done = done_steps(steps)
    cached = sum(1 for s in steps if s["cached"])
    skipped = f" ({done - cached} not kept)" if done > cached else ""
    click.echo(
        f"{database_name(alias, ref, None)} ({out['kind']}): {len(steps)} step(s), {cached} cached"
        f"{skipped}, {len(steps) - done} to run  (current state: {out['status']})"
    )
    marks = [
        "yes" if s["cached"] else "not kept" if i < done else "run" for i, s in enumerate(steps)
    ]
    render.table(
        "",
        ["#", "STATE", "STEP", "CACHED"],
        [[str(i + 1), render.short(s["state"]), s["label"], marks[i]] for i, s in enumerate(steps)],
    )


def done_steps(steps: list[dict[str, Any]]) -> int:
    """How many steps a build does not run: up to the deepest cached one, where it starts.
    Uncached steps before it were not kept (`liquibase.keep_every`) or were evicted."""
    return max((i + 1 for i, s in enumerate(steps) if s["cached"]), default=0)


def dsn_for(c: AdminClient, database: str, user: str) -> tuple[dict[str, str], str]:
    """libpq settings and a URL that reach `database` through the running proxy."""
    listeners = c.get("/v1/status")["listeners"]["proxy"]
    if not listeners:
        raise CliError("the proxy has no listener")
    where = listeners[0]
    db = urllib.parse.quote(database, safe=":")
    if where.startswith("/"):  # a unix socket path: …/.s.PGSQL.PORT
        sock_dir, _, name = where.rpartition("/")
        port = name.rsplit(".", 1)[-1]
        env = {"PGHOST": sock_dir, "PGPORT": port}
        return env, f"postgresql://{user}@/{db}?host={urllib.parse.quote(sock_dir)}&port={port}"
    host, _, port = where.rpartition(":")
    return {"PGHOST": host, "PGPORT": port}, f"postgresql://{user}@{host}:{port}/{db}"


def build(ctx: click.Context, c: AdminClient, alias: str, ref: str | None = None) -> dict[str, Any]:
    """Prepare through the proxy with a progress bar (events on stderr); the result line.

    The bar counts every step of the recipe: the cached ones are done from the start, so a
    cached three-step recipe shows 3/3, and a failure (live or replayed) stops at its step.
    """
    quiet = as_json(ctx)
    labels: list[str] = []
    cached = 0
    if not quiet:
        steps = c.get(f"/v1/aliases/{alias}/plan", **_query(ref))["steps"]
        labels = [str(s["label"]) for s in steps]
        cached = done_steps(steps)
    total = len(labels) or None
    result: dict[str, Any] | None = None
    started = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=quiet,
        transient=False,
    )
    with progress:
        task = progress.add_task(f"preparing {alias}", total=total, completed=cached)
        for line in c.stream("POST", f"/v1/aliases/{alias}/prepare", **_query(ref)):
            if "event" in line:
                ev = line["event"]
                if ev["kind"] == "step.start":
                    # A step starting means the one before it is stored.
                    progress.update(task, advance=1 if started else 0)
                    progress.update(task, description=f"{alias}: {ev['message']}"[:70])
                    started += 1
                elif ev["kind"] == "progress":
                    progress.update(task, description=f"{alias}: {ev['message']}"[:70])
            elif "error" in line:
                err = line["error"]
                # The step that failed: the one running (live), else the first not cached
                # (a remembered failure replays without running anything).
                at = cached + max(started, 1)
                if labels and at <= len(labels):
                    progress.update(
                        task,
                        completed=at - 1,
                        description=f"{alias}: failed at step {at}/{len(labels)}"
                        f" ({labels[at - 1]})"[:70],
                    )
                raise CliError(err["message"], EXIT_FAILED, hint=err.get("hint"))
            elif "result" in line:
                result = line["result"]
                done = total or 1
                progress.update(task, completed=done, total=done, description=f"{alias}: ready")
    if result is None:
        raise CliError("the proxy ended the prepare without a result (see its log)")
    return result


def do_prepare(
    ctx: click.Context, alias: str, kind: str | None, label: str | None, user: str,
    ref: str | None = None,
) -> None:  # fmt: skip
    c = client(ctx)
    recipe_kind(c, alias, kind)
    result = build(ctx, c, alias, ref)
    database = database_name(alias, ref, label)
    _, dsn = dsn_for(c, database, user)
    _, state_dsn = dsn_for(c, f"state:{result['state']}", user)
    if as_json(ctx):
        render.emit_json({**result, "dsn": dsn, "state_dsn": state_dsn})
    else:
        click.echo(dsn)


def do_run(
    ctx: click.Context, tool: str, alias: str, label: str | None, user: str,
    args: tuple[str, ...], ref: str | None = None,
) -> None:  # fmt: skip
    c = client(ctx)
    build(ctx, c, alias, ref)  # an unknown alias is the proxy's 404, with the aliases it knows
    exe = shutil.which(tool)
    if exe is None:
        raise CliError(f"{tool} is not on PATH", EXIT_FAILED)
    database = database_name(alias, ref, label)
    env, _ = dsn_for(c, database, user)
    env.update(PGUSER=user, PGDATABASE=database)
    # The tool's own output streams straight to the terminal; its exit status is ours.
    code = subprocess.call([exe, *args], env={**os.environ, **env})
    ctx.exit(code)


ref_option = click.option(
    "--ref",
    metavar="REF",
    help="A git branch, tag or commit: the recipe's files as of that commit (ALIAS@REF).",
)


def _register(group: click.Group) -> None:
    group.add_command(_plan_command(None))
    group.add_command(_prepare_command(None))
    for kind in ("psql", "lb"):
        group.add_command(_plan_command(kind))
        group.add_command(_prepare_command(kind))
    for tool in ("psql", "pgbench"):
        group.add_command(_run_command(tool))


def _plan_command(kind: str | None) -> click.Command:
    @click.command(name=f"plan:{kind}" if kind else "plan")
    @click.argument("alias")
    @ref_option
    @json_option
    @click.pass_context
    def plan(ctx: click.Context, alias: str, ref: str | None) -> None:
        do_plan(ctx, alias, kind, ref)

    what = f"a {kind} recipe" if kind else "a recipe (any kind)"
    plan.help = (
        f"What preparing {what} would run, and which steps are cached.\n\n"
        f"Example: sqlrs {plan.name} shop"
    )
    return plan


def _prepare_command(kind: str | None) -> click.Command:
    @click.command(name=f"prepare:{kind}" if kind else "prepare")
    @click.argument("alias")
    @click.option("--label", help="Print the DSN of the shared instance ALIAS:LABEL.")
    @click.option("--user", "-U", default="postgres", show_default=True)
    @ref_option
    @json_option
    @click.pass_context
    def prepare(
        ctx: click.Context, alias: str, label: str | None, user: str, ref: str | None
    ) -> None:
        do_prepare(ctx, alias, kind, label, user, ref)

    what = f"a {kind} recipe's" if kind else "a recipe's (any kind)"
    prepare.help = (
        f"Build {what} state now (progress on stderr), then print a DSN"
        " to an instance of it through the proxy.\n\n"
        f"Example: export DATABASE_URL=$(sqlrs {prepare.name} shop)"
    )
    return prepare


def _run_command(tool: str) -> click.Command:
    @click.command(name=f"run:{tool}", context_settings={"ignore_unknown_options": True})
    @click.argument("alias")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.option("--label", help="Use the shared instance ALIAS:LABEL.")
    @click.option("--user", "-U", default="postgres", show_default=True)
    @ref_option
    @click.pass_context
    def run(
        ctx: click.Context,
        alias: str,
        args: tuple[str, ...],
        label: str | None,
        user: str,
        ref: str | None,
    ) -> None:
        do_run(ctx, tool, alias, label, user, args, ref)

    example = "-c 'select 1'" if tool == "psql" else "-- -c 4 -T 10 -S"
    run.help = (
        f"Prepare the recipe if needed, then run {tool} against its instance through"
        f" the proxy; arguments after ALIAS go to {tool}.\n\n"
        f"Example: sqlrs run:{tool} shop {example}"
    )
    return run


register = _register
