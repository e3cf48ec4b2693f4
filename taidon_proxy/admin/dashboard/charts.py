"""Geometry for the inline SVGs the server draws: the cache bars, the state tree, build progress."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BAR_WIDTH = 480  # px of a full bar
ROW = 41  # px between two states of the tree: a row of the table beside it
TOP = 54  # px: the table's header, then half a row
INDENT = 26  # px per generation
# "applying a.sql (2/3)" (psql, command, Alembic, Django) or "changeset 2/3 …" (Liquibase)
STEP_OF = re.compile(r"\((\d+)/(\d+)\)$|^changeset (\d+)/(\d+) ")


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    limit: int
    width: int  # px of the value, at most BAR_WIDTH
    over: bool


def _bar(label: str, value: int, limit: int) -> Bar:
    frac = value / limit if limit > 0 else 0.0
    return Bar(label, value, limit, round(BAR_WIDTH * min(1.0, frac)), limit > 0 and value > limit)


def cache_bars(usage: dict[str, Any]) -> list[Bar]:
    """Cache use against its high-water mark; the filesystem's use against its size."""
    total = int(usage.get("total_bytes") or 0)
    free = int(usage.get("free_bytes") or 0)
    return [
        _bar("cache", int(usage.get("used_bytes") or 0), int(usage.get("high_water_bytes") or 0)),
        _bar("filesystem", total - free, total),
    ]


@dataclass(frozen=True)
class Node:
    state: dict[str, Any]
    x: int
    y: int
    parent_x: int | None
    parent_y: int | None


def tree(states: list[dict[str, Any]]) -> list[Node]:
    """States in depth-first order, each one row down and one indent right of its parent."""
    ids = {s["id"] for s in states}
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for s in sorted(states, key=lambda s: (s["created"] or 0, s["id"])):
        parent = s["parent"] if s["parent"] in ids else None
        kids.setdefault(parent, []).append(s)
    out: list[Node] = []
    stack: list[tuple[dict[str, Any], int, Node | None]] = [
        (s, 0, None) for s in reversed(kids.get(None, []))
    ]
    while stack:
        s, depth, up = stack.pop()
        node = Node(
            s,
            x=12 + depth * INDENT,
            y=TOP + len(out) * ROW,
            parent_x=up.x if up else None,
            parent_y=up.y if up else None,
        )
        out.append(node)
        stack.extend((k, depth + 1, node) for k in reversed(kids.get(s["id"], [])))
    return out


def tree_height(nodes: list[Node]) -> int:
    return TOP + len(nodes) * ROW


@dataclass(frozen=True)
class Progress:
    done: int
    total: int | None  # None until the first step says how many there are
    percent: int
    step: str | None


def progress(status: str | None, events: list[dict[str, Any]]) -> Progress:
    """How far a build is, from its `step.start` events ("… (2/3)", "changeset 2/3 …")."""
    step: str | None = None
    done, total = 0, None
    for ev in events:
        if ev["kind"] == "step.start":
            step = ev["message"]
            m = STEP_OF.search(step)
            if m:
                i, n = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                done, total = int(i) - 1, int(n)
        elif ev["kind"] == "snapshot" and total is not None:
            done = min(total, done + 1)
    if status == "succeeded":
        return Progress(total or done, total or done, 100, step)
    percent = round(100 * done / total) if total else 0
    return Progress(done, total, percent, step)
