"""`sqlrs diff A B`: a structural schema diff of two databases reached through the proxy."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import click

from taidon_proxy.cli import render
from taidon_proxy.cli.context import as_json, client, json_option
from taidon_proxy.cli.errors import EXIT_FAILED, CliError
from taidon_proxy.cli.prepare import dsn_for
from taidon_proxy.schemadiff.catalog import Schema, capture
from taidon_proxy.schemadiff.compare import Change, compare

MARK = {"added": "+", "removed": "-", "changed": "~"}
CONNECT_TIMEOUT = 600.0  # a side may need a build first


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--rows", is_flag=True, help="Also compare each table's row count.")
@click.option("--user", default="postgres", show_default=True, help="Role to connect as.")
@json_option
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, rows: bool, user: str) -> None:
    """Compare the schemas of two databases: aliases, labels, refs or states.

    Each side is a database name as a client would use it (shop, shop:mine, shop@main,
    state:3f2a…): built or started as for any client. Exit 0 when equal, 1 when not.

    \b
    Example: sqlrs diff shop@main shop@feature-x
             sqlrs diff shop state:3f2a9c --rows --json
    """
    c = client(ctx)
    urls = [dsn_for(c, side, user)[1] for side in (a, b)]
    left, right = asyncio.run(_capture_both(urls, rows))
    changes = compare(left, right)
    if as_json(ctx):
        render.emit_json(
            {"a": a, "b": b, "equal": not changes,
             "changes": [dataclasses.asdict(ch) for ch in changes]}
        )  # fmt: skip
    else:
        _print(a, b, changes)
    ctx.exit(0 if not changes else 1)


async def _capture_both(urls: list[str], rows: bool) -> tuple[Schema, Schema]:
    async def one(url: str) -> Schema:
        try:
            conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        except asyncpg.PostgresError as e:
            raise CliError(f"{url.rsplit('/', 1)[-1]}: {e}", EXIT_FAILED) from None
        try:
            return await capture(conn, rows=rows)
        finally:
            await conn.close()

    left, right = await asyncio.gather(one(urls[0]), one(urls[1]))
    return left, right


def _print(a: str, b: str, changes: list[Change]) -> None:
    if not changes:
        click.echo(f"{a} and {b}: same schema")
        return
    click.echo(f"--- {a}\n+++ {b}")
    kind = None
    for ch in changes:
        if ch.kind != kind:
            kind = ch.kind
            click.echo(f"{kind}:")
        line = f"  {MARK[ch.op]} {ch.name}"
        if ch.op == "changed":
            line += f": {_one_line(ch.before)} -> {_one_line(ch.after)}"
        elif ch.kind in ("columns", "constraints", "indexes", "sequences", "rows", "grants"):
            line += f": {_one_line(ch.after if ch.op == 'added' else ch.before)}"
        click.echo(line)


def _one_line(text: str | None, width: int = 120) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
