"""Two captured schemas, compared kind by kind: what was added, removed or changed."""

from __future__ import annotations

from dataclasses import dataclass

from taidon_proxy.schemadiff.catalog import Schema


@dataclass(frozen=True)
class Change:
    kind: str  # tables, columns, constraints, ...
    name: str  # qualified: schema.table[.column]
    op: str  # "added" (only in B), "removed" (only in A), "changed"
    before: str | None
    after: str | None


def compare(a: Schema, b: Schema) -> list[Change]:
    """Changes from a to b, ordered by kind (as captured) and name."""
    out = []
    for kind in dict.fromkeys([*a, *b]):
        left, right = a.get(kind, {}), b.get(kind, {})
        for name in sorted(left.keys() | right.keys()):
            x, y = left.get(name), right.get(name)
            if x == y:
                continue
            op = "added" if x is None else "removed" if y is None else "changed"
            out.append(Change(kind, name, op, x, y))
    return _without_implied(out)


def _without_implied(changes: list[Change]) -> list[Change]:
    """A table added or removed carries its columns, constraints and grants: name it once."""
    whole = {c.name for c in changes if c.kind == "tables" and c.op != "changed"}
    parts = ("columns", "constraints", "grants", "rows")
    return [
        c for c in changes
        if not (c.kind in parts and _table_of(c.name) in whole)
    ]  # fmt: skip


def _table_of(name: str) -> str:
    schema, _, rest = name.partition(".")
    table = rest.split(" to ", 1)[0].split(".", 1)[0]
    return f"{schema}.{table}"
