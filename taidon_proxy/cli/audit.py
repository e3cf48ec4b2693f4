"""`sqlrs admin audit …`: list, export and verify the proxy's hash-chained audit log."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from taidon_proxy.cli import render
from taidon_proxy.cli.context import as_json, client, json_option
from taidon_proxy.cli.errors import EXIT_FAILED, CliError

# The fields shown in the table's last column, per kind (the rest: --json).
_SHOWN = ("alias", "label", "database", "address", "instance", "state", "name", "result",
          "outcome", "sqlstate", "job", "target")  # fmt: skip


def _details(r: dict[str, Any]) -> str:
    f = r["fields"]
    parts = [f"{k}={f[k]}" for k in _SHOWN if f.get(k) not in (None, "")]
    if r["kind"] == "connection":
        parts.append(f"in={render.size(f.get('bytes_in'))} out={render.size(f.get('bytes_out'))}")
        parts.append(f"took={render.duration(f.get('duration'))}")
    return " ".join(parts)


def audit_table(rows: list[dict[str, Any]]) -> None:
    render.table(
        "audit",
        ["SEQ", "TIME (UTC)", "KIND", "ACTOR", "DETAILS"],
        [
            [
                str(r["seq"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"])),
                r["kind"],
                r["actor"] or "-",
                _details(r),
            ]
            for r in rows
        ],
    )


@click.group(invoke_without_command=True)
@click.option("--user", help="Only this actor (a client's startup user, or admin).")
@click.option("--alias", help="Only records about this alias.")
@click.option("--kind", help="Only this kind: connection, auth_failure, build, reset, ...")
@click.option("--since", help="From this time: epoch seconds, ISO 8601, or an age (15m, 2h).")
@click.option("--until", help="Before this time (same forms as --since).")
@click.option("--limit", type=int, default=100, show_default=True, help="At most this many.")
@json_option
@click.pass_context
def audit(ctx: click.Context, /, **filters: Any) -> None:
    """The audit log: who connected, built, reset, snapshotted, pinned, removed (newest last).

    \b
    Examples:
      sqlrs admin audit --user ana --since 2h
      sqlrs admin audit verify
      sqlrs admin audit export > audit.jsonl
    """
    if ctx.invoked_subcommand is not None:
        return
    query = {k: v for k, v in filters.items() if v is not None}
    rows = client(ctx).get("/v1/audit", **query)
    render.emit_json(rows) if as_json(ctx) else audit_table(rows)


@audit.command()
@json_option
@click.pass_context
def verify(ctx: click.Context) -> None:
    """Walk the hash chain; exit 1 naming the first broken record if any was edited, removed,
    reordered or cut from the end.

    Example: sqlrs admin audit verify
    """
    out = client(ctx).get("/v1/audit/verify")
    if as_json(ctx):
        render.emit_json(out)
    elif out["ok"]:
        head = (out.get("head_hash") or "")[:16]
        click.echo(f"audit log intact: {out['records']} records, last seq {out['last_seq']}"
                   f" (head {head})")  # fmt: skip
    if not out["ok"]:
        raise CliError(f"audit log broken at seq {out['broken_seq']}: {out['reason']}", EXIT_FAILED)


@audit.command()
@click.pass_context
def export(ctx: click.Context) -> None:
    """Every record as JSON lines on stdout, in seq order.

    Example: sqlrs admin audit export > audit.jsonl
    """
    client(ctx).download("/v1/audit/export", sys.stdout.buffer)
    sys.stdout.buffer.flush()
