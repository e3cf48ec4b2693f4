"""`sqlrs token create|list|revoke`: personal access tokens (the team server), through the API.

With TAIDON_TOKEN set the CLI sends that token instead of the store's admin token, so a team
member's own commands run as that member.
"""

from __future__ import annotations

import time

import click

from taidon_proxy.cli import render
from taidon_proxy.cli.context import as_json, client, json_option


@click.group()
def token() -> None:
    """Personal access tokens: a password for Postgres clients and a bearer for the API.

    \b
    Example:
      sqlrs token create ci-payments-main --user ci-payments --expires 30d
    """


@token.command()
@click.argument("name")
@click.option("--expires", default=None, help="Lifetime: 30d, 12h, seconds (default 90d).")
@click.option("--user", default=None, help="Another user's token (admins only).")
@json_option
@click.pass_context
def create(ctx: click.Context, name: str, expires: str | None, user: str | None) -> None:
    """Create a token; its text is shown this once (store it as a secret).

    Example: sqlrs token create laptop --expires 30d
    """
    body: dict[str, object] = {"name": name}
    if expires is not None:
        body["expires_in"] = expires
    if user is not None:
        body["user"] = user
    made = client(ctx).call("POST", "/v1/tokens", body)
    if as_json(ctx):
        render.emit_json(made)
        return
    click.echo(made["token"])
    click.echo(
        f"token {made['id']} for {made['user']}, expires in"
        f" {render.duration(made['expires'] - time.time())}; it is not shown again",
        err=True,
    )


@token.command("list")
@json_option
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Tokens (never their text): id, user, name, created, expiry, revoked.

    Example: sqlrs token list
    """
    rows = client(ctx).get("/v1/tokens")
    if as_json(ctx):
        render.emit_json(rows)
        return
    now = time.time()
    render.table(
        "tokens",
        ["ID", "USER", "NAME", "CREATED", "EXPIRES", "STATE"],
        [
            [
                r["id"], r["user"], r["name"], render.ago(r["created"]),
                time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["expires"])),
                "revoked" if r["revoked"] else ("expired" if r["expires"] <= now else "valid"),
            ]
            for r in rows
        ],
    )  # fmt: skip


@token.command()
@click.argument("token_id")
@json_option
@click.pass_context
def revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke a token by its id: clients using it are refused from now on.

    Example: sqlrs token revoke 3f9c0a1b2d4e
    """
    row = client(ctx).call("DELETE", f"/v1/tokens/{token_id}")
    render.emit_json(row) if as_json(ctx) else click.echo(f"revoked token {row['id']}")
