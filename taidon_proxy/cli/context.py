"""What every command gets from the `sqlrs` group: config path, output mode, the API client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from taidon_proxy.cli.client import AdminClient

F = TypeVar("F", bound=Callable[..., Any])


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(dict)["json"] = True


def json_option(f: F) -> F:
    """`--json` after the command too (`sqlrs ls --json` as well as `sqlrs --json ls`)."""
    return click.option(
        "--json",
        "json_",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        is_eager=True,
        help="Machine-readable output.",
    )(f)


def as_json(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj.get("json"))


def config_path(ctx: click.Context) -> Path:
    path: Path = ctx.find_root().obj["config_path"]
    return path


def client(ctx: click.Context) -> AdminClient:
    root = ctx.find_root().obj
    return AdminClient.open(root["config_path"], start=bool(root.get("start")))
