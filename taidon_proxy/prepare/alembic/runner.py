"""Run inside the project's interpreter: plan an Alembic project or upgrade it to one revision.

Loaded by `pytool_entry` (`plan` or `upgrade`, with one JSON object of arguments), which writes
the answer after Alembic's and the migration's own output. It imports nothing of the proxy.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def _config(args: dict[str, Any]) -> Any:
    from alembic.config import Config

    cfg = Config(args["config"])
    # What `alembic -x k=v` sets: env.py reads it with context.get_x_argument().
    cfg.cmd_opts = argparse.Namespace(x=list(args.get("x") or []))
    return cfg


def plan(args: dict[str, Any]) -> dict[str, Any]:
    import alembic
    from alembic.script import ScriptDirectory

    cfg = _config(args)
    if not cfg.get_main_option("script_location"):
        raise LookupError(f"{args['config']}: no script_location in [alembic]")
    script = ScriptDirectory.from_config(cfg)
    target = args.get("target") or "heads"
    if target == "head":
        heads = script.get_heads()
        if len(heads) > 1:
            raise LookupError(
                "target 'head' but the revision graph has several heads: "
                + ", ".join(sorted(heads))
                + " (merge them, or use target: heads)"
            )
    # walk_revisions yields newest first in a topological order; reversed is upgrade order.
    revs = list(reversed(list(script.walk_revisions("base", target))))
    return {
        "alembic_version": alembic.__version__,
        "env_py": os.path.join(script.dir, "env.py"),
        "dirs": sorted({script.versions} | {os.path.dirname(r.path) for r in revs}),
        "revisions": [{"id": r.revision, "path": r.path} for r in revs],
    }


def upgrade(args: dict[str, Any]) -> dict[str, Any]:
    from alembic import command

    cfg = _config(args)
    # The build server, whatever sqlalchemy.url in the ini says ('%' escaped for configparser).
    cfg.set_main_option("sqlalchemy.url", args["url"].replace("%", "%%"))
    command.upgrade(cfg, args["revision"])
    return {"revision": args["revision"]}
