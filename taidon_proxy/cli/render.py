"""Human output: rich tables, the state tree, sizes and ages; JSON output for scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

SHORT_ID = 12


PIPE_WIDTH = 100_000  # piped output: as wide as the rows are, never folded at 80 columns


def console() -> Console:
    """The terminal's width on a terminal; unlimited when piped, so rows stay whole."""
    c = Console(highlight=False, soft_wrap=False)
    if not c.is_terminal:
        c = Console(highlight=False, soft_wrap=False, width=PIPE_WIDTH)
    return c


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def size(n: int | None) -> str:
    if not n:
        return "0"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ago(ts: float | None) -> str:
    return "-" if not ts else duration(max(0.0, time.time() - ts)) + " ago"


def short(value: str | None) -> str:
    return "-" if not value else value[:SHORT_ID]


def table(title: str, columns: Sequence[str], rows: list[list[str]]) -> None:
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(Text(c) for c in r))
    console().print(t)


def states_table(states: list[dict[str, Any]]) -> None:
    table(
        "states",
        ["ID", "KIND", "ALIAS", "LABEL", "SIZE", "USED", "USES", "NAMES", "PIN", "INST"],
        [
            [
                short(s["id"]),
                s["kind"],
                s["alias"] or "-",
                s["label"],
                size(s["size_bytes"]),
                ago(s["last_used"]),
                str(s["use_count"]),
                ",".join(s["names"]) or "-",
                "yes" if s["pinned"] else "",
                str(len(s["instances"])) if s["instances"] else "",
            ]
            for s in states
        ],
    )


def state_label(s: dict[str, Any]) -> str:
    extra = []
    if s["names"]:
        extra.append("names: " + ",".join(s["names"]))
    if s["pinned"]:
        extra.append("pinned")
    if s["instances"]:
        extra.append(f"{len(s['instances'])} instance(s)")
    tail = f"  [{'; '.join(extra)}]" if extra else ""
    return (
        f"{short(s['id'])}  {s['kind']}  {s['label']}  {size(s['size_bytes'])}"
        f"  used {ago(s['last_used'])}{tail}"
    )


def state_tree(states: list[dict[str, Any]]) -> None:
    ids = {s["id"] for s in states}
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for s in states:
        parent = s["parent"] if s["parent"] in ids else None
        kids.setdefault(parent, []).append(s)
    root = Tree("states", hide_root=False)
    stack: list[tuple[Tree, dict[str, Any]]] = [(root, s) for s in reversed(kids.get(None, []))]
    while stack:  # iterative: chains of hundreds of changesets are deep
        parent_node, s = stack.pop()
        node = parent_node.add(Text(state_label(s)))  # labels are data, not markup
        stack.extend((node, k) for k in reversed(kids.get(s["id"], [])))
    console().print(root)


def instance_target(i: dict[str, Any]) -> str:
    """What a client connects to for it: ALIAS:LABEL, state:ID:LABEL, or the alias."""
    if i["key"].startswith("state:") and i["label"]:
        return f"state:{short(i['state'])}:{i['label']}"
    if i["label"] and i["isolation"] == "shared":
        return f"{i['alias']}:{i['label']}"
    return i["alias"] or "-"


def instance_state(i: dict[str, Any]) -> str:
    """The state id; marked when the recipe has moved on (reset gets the new state)."""
    if i.get("recipe_current") is False:
        return f"{short(i['state'])} (recipe moved on)"
    return short(i["state"])


def instance_kept(i: dict[str, Any]) -> str:
    """How long a shared instance's clone is kept once stopped: left until removal, or -."""
    if i["isolation"] != "shared":
        return "-"
    if not i.get("retention_seconds"):
        return "forever"
    if i["status"] == "stopped" and i.get("expires_in_seconds") is not None:
        return duration(i["expires_in_seconds"]) + " left"
    return duration(i["retention_seconds"]) + " idle"


def instances_table(instances: list[dict[str, Any]]) -> None:
    table(
        "instances",
        ["ID", "ALIAS:LABEL", "ISOLATION", "STATE", "STATUS", "CONN", "AGE", "IDLE", "KEPT"],
        [
            [
                i["id"],
                instance_target(i),
                i["isolation"],
                instance_state(i),
                i.get("status", "running"),
                str(i["connections"]),
                duration(i["age_seconds"]),
                duration(i["idle_seconds"]) if not i["connections"] else "-",
                instance_kept(i),
            ]
            for i in instances
        ],
    )


def connections_table(conns: list[dict[str, Any]]) -> None:
    table(
        "connections",
        ["ID", "CLIENT", "USER", "DATABASE", "INSTANCE", "IN", "OUT", "AGE"],
        [
            [
                c["id"],
                c["client"],
                c["user"],
                c["database"],
                c["instance"] or "(waiting)",
                size(c["bytes_from_client"]),
                size(c["bytes_to_client"]),
                duration(c["age_seconds"]),
            ]
            for c in conns
        ],
    )


def _status(job: dict[str, Any]) -> str:
    """A job's status, with its place in the build queue while it waits."""
    q = job.get("queue")
    if not q or q.get("state") != "queued":
        return str(job["status"])
    return f"queued #{q['position']} ({q['priority']}, team {q['team'] or '-'})"


def jobs_table(jobs: list[dict[str, Any]]) -> None:
    table(
        "jobs",
        ["ID", "ALIAS", "STATUS", "STARTED", "TOOK", "STEPS", "TARGET / ERROR"],
        [
            [
                j["id"],
                j["alias"] or "-",
                _status(j),
                ago(j["started"]),
                duration(j["finished"] - j["started"]) if j.get("finished") else "-",
                str(len(j["steps"])) if j.get("steps") is not None else "-",
                short(j["target"]) if j["status"] == "succeeded" else (j.get("error") or ""),
            ]
            for j in jobs
        ],
    )


def aliases_table(aliases: list[dict[str, Any]]) -> None:
    table(
        "aliases",
        ["ALIAS", "KIND", "DATABASE", "ISOLATION", "STATE", "STATUS"],
        [
            [a["alias"], a["kind"], a["database"], a["isolation"], short(a["state"]), a["status"]]
            for a in aliases
        ],
    )


def event_line(ev: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev["ts"]))
    return f"{stamp} {ev['kind']:<10} {ev['message']}"


def json_line(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
