"""The `sqlrs` command line: the group, global options, `serve`, and command registration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from taidon_proxy.cli import bundles, local, login, prepare, provenance, tokens
from taidon_proxy.cli.admin import admin
from taidon_proxy.cli.context import with_common_options
from taidon_proxy.cli.diff import diff
from taidon_proxy.cli.errors import EXIT_CODES, EXIT_CONFIG, EXIT_FAILED
from taidon_proxy.config import Config
from taidon_proxy.config_load import find_config_path, load_config, parse_config
from taidon_proxy.config_profiles import PROFILE_ENV
from taidon_proxy.errors import TaidonError
from taidon_proxy.runtimes.base import RuntimeError_

EPILOG = "Exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items())


class SqlrsGroup(click.Group):
    """The `sqlrs` group: every command below it takes the common options after its name too."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        with_common_options(cmd)
        super().add_command(cmd, name)


@click.group(
    cls=SqlrsGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG
)
@click.version_option(
    package_name="taidon-proxy", prog_name="sqlrs", message="%(prog)s %(version)s"
)
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None,
    help="Config file (default: $TAIDON_CONFIG, else ./taidon.yaml).",
)  # fmt: skip
@click.option(
    "--profile", default=None, metavar="NAME",
    help="The config's profile to apply (default: $TAIDON_PROFILE).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--start", is_flag=True, help="Start the proxy in the background if none runs.")
@click.pass_context
def cli(
    ctx: click.Context, config_path: Path | None, profile: str | None, as_json: bool, start: bool
) -> None:
    """Taidon proxy: prepared, isolated Postgres databases behind a connection string.

    \b
    Example:
      sqlrs init && sqlrs serve
    """
    if profile is not None:  # every load in this process (and a proxy it starts) sees it
        os.environ[PROFILE_ENV] = profile
    ctx.obj = {
        "config_path": find_config_path(config_path),
        # Neither --config nor $TAIDON_CONFIG: a bare `sqlrs serve` may discover migrations.
        "config_given": config_path is not None or bool(os.environ.get("TAIDON_CONFIG")),
        "json": as_json,
        "start": start,
    }


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

    Example: sqlrs serve --config config/demo.yaml
    """
    from taidon_proxy.cli.logging import configure
    from taidon_proxy.cli.serve import run

    configure(json=log_json, level=log_level)
    try:
        cfg = serve_config(ctx.obj["config_path"], given=ctx.obj["config_given"])
        run(cfg, loop=loop)
    except RuntimeError_ as e:  # the runtime could not open (no os user, no daemon): exit 1
        click.echo(f"sqlrs: {e.message}", err=True)
        sys.exit(EXIT_FAILED)
    except TaidonError as e:
        click.echo(f"sqlrs: {e.message}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as e:  # a port in use, most often
        click.echo(f"sqlrs: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        pass


def serve_config(path: Path, *, given: bool) -> Config:
    """The config file; with none given and no ./taidon.yaml, the migrations discovered here."""
    if given or path.exists():
        return load_config(path)
    from taidon_proxy.cli.discovered import config_text, echo_found
    from taidon_proxy.discovery import discover

    found = discover(Path.cwd())
    found.choose()  # none, or more than one: the error says what was (not) found
    echo_found(found)
    text = config_text(found, store=".taidon/store", backend="auto", reason="discovered")
    return parse_config(text, source=Path.cwd() / "taidon.yaml")


cli.add_command(admin)
cli.add_command(tokens.token)
cli.add_command(login.login)
cli.add_command(login.logout)
cli.add_command(bundles.state)
cli.add_command(bundles.explain)
cli.add_command(provenance.provenance)
cli.add_command(diff)
for command in (local.init, local.config, local.status, local.ls, local.rm, local.logs):
    cli.add_command(command)
prepare.register(cli)


def main() -> None:
    cli()
