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


def _set_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        obj = ctx.ensure_object(dict)
        obj["config_path"] = value
        obj["config_given"] = True


def _set_start(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(dict)["start"] = True


def _common_options() -> list[click.Option]:
    """The group's own options, as a command takes them after its name (same meaning)."""
    return [
        click.Option(
            ["--config", "config_path_"],
            type=click.Path(path_type=Path),
            expose_value=False,
            callback=_set_config,
            help="Config file (default: $TAIDON_CONFIG, else ./taidon.yaml).",
        ),
        click.Option(
            ["--json", "json_"],
            is_flag=True,
            expose_value=False,
            callback=_set_json,
            is_eager=True,
            help="Machine-readable output.",
        ),
        click.Option(
            ["--start", "start_"],
            is_flag=True,
            expose_value=False,
            callback=_set_start,
            help="Start the proxy in the background if none runs.",
        ),
    ]


def with_common_options(cmd: click.Command) -> None:
    """Give a command (and, for a group, each of its commands) --config, --json and --start.

    `sqlrs serve --config FILE` then means `sqlrs --config FILE serve`: people type both.
    """
    for option in _common_options():
        if not any(set(option.opts) & set(p.opts) for p in cmd.params):
            cmd.params.append(option)
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            with_common_options(sub)


def as_json(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj.get("json"))


def config_path(ctx: click.Context) -> Path:
    path: Path = ctx.find_root().obj["config_path"]
    return path


def client(ctx: click.Context) -> AdminClient:
    root = ctx.find_root().obj
    return AdminClient.open(root["config_path"], start=bool(root.get("start")))
