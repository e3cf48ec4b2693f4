"""The `sqlrs` command line: entry point and the commands that need no running proxy."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from taidon_proxy.config import find_config_path, load_config
from taidon_proxy.errors import TaidonError

EXIT_USAGE = 2
EXIT_CONFIG = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None,
    help="Config file (default: $TAIDON_CONFIG, else ./taidon.yaml).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """Taidon proxy: prepared, isolated Postgres databases behind a connection string."""
    ctx.obj = {"config_path": find_config_path(config_path), "json": as_json}


@cli.command()
@click.option("--log-json", is_flag=True, help="Log as JSON lines.")
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop", show_default=True,
    help="Event loop implementation.",
)  # fmt: skip
@click.pass_context
def serve(ctx: click.Context, log_json: bool, log_level: str, loop: str) -> None:
    """Run the proxy (and admin endpoint) in the foreground.

    Example: sqlrs --config config/demo.yaml serve
    """
    from taidon_proxy.cli.logging import configure
    from taidon_proxy.cli.serve import run

    configure(json=log_json, level=log_level)
    try:
        cfg = load_config(ctx.obj["config_path"])
        run(cfg, loop=loop)
    except TaidonError as e:
        click.echo(f"sqlrs: {e.message}", err=True)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        pass


def main() -> None:
    cli()
