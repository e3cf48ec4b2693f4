"""`sqlrs provenance STATE` and GET /v1/states/{ref}/provenance: every input that made a state,
from its initdb root to it (the records kept at build or import, docs/provenance.md)."""

from __future__ import annotations

from typing import Any

from taidon_proxy.services.lookup import find_state
from taidon_proxy.store.metadata_api import MetadataStore

MAX_CHAIN = 100_000


async def chain_ids(meta: MetadataStore, state_id: str) -> list[tuple[str, str | None, str, str]]:
    """(id, parent, kind, label) from the initdb root to the state, by the recorded links; a
    state without a recorded derivation (a live snapshot) ends the walk at itself."""
    out: list[tuple[str, str | None, str, str]] = []
    sid: str | None = state_id
    while sid is not None and len(out) < MAX_CHAIN:
        link = await meta.link(sid)
        if link is None:
            row = await meta.get_state(sid)
            kind, label = (row.kind, row.label) if row is not None else ("unknown", "")
            out.append((sid, row.parent if row and row.kind != "initdb" else None, kind, label))
            break
        out.append((link.id, link.parent, link.kind, link.label))
        sid = link.parent
    return out[::-1]


async def provenance(meta: MetadataStore, ref: str) -> dict[str, Any]:
    """The state (name, id or prefix), its chain, and each state's record (None: built before
    provenance was recorded, or a snapshot of a live instance)."""
    row = await find_state(meta, ref)
    chain = await chain_ids(meta, row.id)
    records = await meta.provenance([c[0] for c in chain])
    root = records.get(chain[0][0], {}) if chain[0][2] == "initdb" else {}
    steps = [
        {"state": sid, "parent": parent, "kind": kind, "label": label, "record": records.get(sid)}
        for sid, parent, kind, label in chain
    ]
    return {
        "state": row.id,
        "alias": row.alias,
        "complete": chain[0][2] == "initdb" and all(s["record"] is not None for s in steps),
        "engine": root.get("engine"),
        "initdb_settings": root.get("initdb_settings"),
        "backend": row.backend,
        "built_on": root.get("backend"),
        "steps": steps,
    }
