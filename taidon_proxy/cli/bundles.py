"""`sqlrs state export|import|verify` and `sqlrs explain`: state bundles for CI caches."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from taidon_proxy.cli import render
from taidon_proxy.cli.context import as_json, client, json_option
from taidon_proxy.cli.errors import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE, CliError
from taidon_proxy.store.bundle import BundleError, Manifest, verify


@click.group()
def state() -> None:
    """Move a prepared state between machines as one file (a bundle), e.g. for a CI cache.

    \b
    Example:
      sqlrs state export shop-final -o shop.tzst && sqlrs state import shop.tzst
    """


def _verify_file(path: Path) -> Manifest:
    """The bundle at `path` checked whole, here, with no proxy: manifest, chain, checksum."""
    try:
        with open(path, "rb") as f:
            return verify(f)
    except FileNotFoundError:
        raise CliError(f"{path}: no such file", EXIT_NOT_FOUND) from None
    except BundleError as e:
        raise CliError(f"{path}: {e.message}", EXIT_USAGE, hint=e.hint) from None
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None


def _summary(m: Manifest, path: Path) -> dict[str, object]:
    return {
        "file": str(path),
        "state": m.state,
        "alias": m.alias,
        "label": m.link.label,
        "chain": len(m.chain),
        "engine": m.engine.version,
        "content_bytes": m.content.size,
        "file_bytes": path.stat().st_size,
        "exported_by": m.exported_by,
    }


@state.command()
@click.argument("ref", metavar="STATE")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True,
    help="The bundle file to write (replaced only once the new one is complete and checked).",
)  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@json_option
@click.pass_context
def export(ctx: click.Context, ref: str, output: Path, force: bool) -> None:
    """Write a state (name, id or unique prefix) with its chain and checksum to a file.

    The proxy streams it; the file appears only after it was read back and verified.

    Example: sqlrs state export $(sqlrs explain --key shop) -o shop.tzst
    """
    if output.exists() and not force:
        raise CliError(f"{output} exists", EXIT_CONFLICT, hint="pass --force to overwrite it")
    c = client(ctx)
    part = output.with_name(f".{output.name}.part")
    try:
        with open(part, "wb") as f:
            c.download(f"/v1/states/{ref}/bundle", f)
            f.flush()
            os.fsync(f.fileno())
        manifest = _verify_file(part)
        os.replace(part, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    out = _summary(manifest, output)
    if as_json(ctx):
        render.emit_json(out)
        return
    click.echo(
        f"exported state {render.short(manifest.state)} ({manifest.link.label}) to {output}:"
        f" {render.size(int(str(out['file_bytes'])))}"
        f" ({render.size(manifest.content.size)} of data)"
    )


@state.command(name="import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--alias", help="The recipe to adopt it for (default: the one it was built for).")
@json_option
@click.pass_context
def import_(ctx: click.Context, file: Path, alias: str | None) -> None:
    """Store a bundle in the running proxy: verified whole first, nothing stored if not.

    If the recipe, planned here, ends at the imported state, its next connection uses it
    without a build.

    Example: sqlrs state import shop.tzst
    """
    c = client(ctx)
    try:
        f = open(file, "rb")  # noqa: SIM115 - closed below, after the upload
    except FileNotFoundError:
        raise CliError(f"{file}: no such file", EXIT_NOT_FOUND) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        query = {"alias": alias} if alias else {}
        try:
            out = c.upload("/v1/bundles", f, size, **query)
        except CliError as e:
            raise CliError(f"{file}: {e.message}", e.exit_code, hint=e.hint) from None
    if as_json(ctx):
        render.emit_json(out)
    else:
        click.echo(out["message"])


@state.command(name="verify")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@json_option
@click.pass_context
def verify_(ctx: click.Context, file: Path) -> None:
    """Check a bundle file here, without a proxy: manifest, chain ids, size and checksum.

    Example: sqlrs state verify shop.tzst
    """
    m = _verify_file(file)
    out = _summary(m, file)
    if as_json(ctx):
        render.emit_json(out)
        return
    click.echo(
        f"{file}: state {render.short(m.state)} ({m.link.label}), {len(m.chain)} links,"
        f" Postgres {m.engine.version}, {render.size(m.content.size)} of data: ok"
    )


def _alias_ref(target: str, ref: str | None) -> tuple[str, str | None]:
    """`ALIAS@REF` (aliases cannot hold `@`), or ALIAS with `--ref REF`; not both."""
    alias, at, named = target.partition("@")
    if not at:
        return alias, ref
    if not alias or not named:
        raise CliError(f'"{target}" is not ALIAS or ALIAS@REF', EXIT_USAGE)
    if ref is not None and ref != named:
        raise CliError(f"{target} names ref {named}, and --ref names {ref}: give one", EXIT_USAGE)
    return alias, named


@click.command()
@click.argument("target", metavar="ALIAS[@REF]")
@click.option("--key", "key_only", is_flag=True, help="Print only the cache key.")
@click.option("--ref", metavar="REF", help="A git branch, tag or commit (the same as ALIAS@REF).")
@json_option
@click.pass_context
def explain(ctx: click.Context, target: str, key_only: bool, ref: str | None) -> None:
    """A recipe's cache key for CI caches, and step by step what is cached and why not.

    The key is the recipe's final state id, planned from its inputs and the proxy's
    Postgres without building: it changes exactly when that state would. Then each step,
    cached or not, and for the first step that is not: what changed since the nearest
    cached state (a file changed, a step is new, the state was evicted). With @REF the
    recipe's files are read from git as of that branch, tag or commit.

    \b
    Example: sqlrs explain --key shop
             sqlrs explain shop@feature-x
    """
    alias, ref = _alias_ref(target, ref)
    c = client(ctx)
    query = {"ref": ref} if ref is not None else {}
    out = c.get(f"/v1/aliases/{alias}/key", **query)
    if key_only:
        click.echo(out["key"])
        return
    plan = c.get(f"/v1/aliases/{alias}/plan", **query)
    if as_json(ctx):
        render.emit_json({**out, "plan": plan["steps"], "first_miss": plan["first_miss"]})
        return
    where = "in this store" if out["cached"] else "not built here yet"
    click.echo(f"{target if ref is None else f'{alias}@{ref}'}: key {out['key']}")
    click.echo(f"  the final state of {out['steps']} step(s), {where}")
    render.table(
        "",
        ["#", "STATE", "STEP", "CACHED"],
        [
            [str(i + 1), render.short(s["state"]), s["label"], "yes" if s["cached"] else "no"]
            for i, s in enumerate(plan["steps"])
        ],
    )
    miss = plan["first_miss"]
    if miss is not None:
        click.echo(f"first miss at step {miss['step']}: {miss['message']}")
