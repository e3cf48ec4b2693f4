"""A config from what discovery found: written by `sqlrs init`, used by a bare `sqlrs serve`."""

from __future__ import annotations

import click
import yaml

from taidon_proxy.discovery import Discovery

STARTER = """\
# Taidon proxy configuration (written by `sqlrs init`). Reference: docs/cli.md.
listen: 127.0.0.1:55432          # clients connect here: postgres://postgres@127.0.0.1:55432/ALIAS
admin: {{listen: 127.0.0.1:55433}} # the CLI talks to the proxy here (token in <store>/admin.token)
store: {store}
snapshot: {{backend: {backend}}}    # {reason}
runtime: {{kind: process}}
auth: {{method: trust}}
instances: {{idle_ttl: 10m, max: 50}}
cache: {{max_size: 20GiB, min_free: 10%}}
"""
EXAMPLES = """\
databases: {}
# databases:
#   shop:
#     prepare: {kind: psql, files: [sql/schema.sql, sql/data.sql]}
#     roles: [app]
#   app:
#     prepare: {kind: lb, search_path: ., changelog: db/changelog/master.xml}
"""


def config_text(found: Discovery | None, *, store: str, backend: str, reason: str) -> str:
    """The starter config; with one discovered layout, its recipe; with several, each of
    them commented out (ambiguity is the user's call, not ours)."""
    text = STARTER.format(store=store, backend=backend, reason=reason.replace("\n", " "))
    if found is None or not found.candidates:
        return text + EXAMPLES
    one = len(found.candidates) == 1
    lines = ["databases:" if one else "databases: {}  # several layouts found: keep one"]
    for c in found.candidates:
        lines.append(f"  # found: {c.layout}: {c.why}")
        block = yaml.safe_dump({found.alias: {"prepare": c.prepare}}, sort_keys=False)
        prefix = "  " if one else "# "
        lines += [prefix + line for line in block.splitlines()]
    return text + "\n".join(lines) + "\n"


def echo_found(found: Discovery) -> None:
    """What was found and why, for people (stderr: stdout stays the command's answer)."""
    for c in found.candidates:
        click.echo(f"found {c.layout}: {c.why} -> database {found.alias}", err=True)
    for note in found.notes:
        click.echo(f"skipped {note}", err=True)
