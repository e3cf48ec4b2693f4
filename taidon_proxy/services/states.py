"""Use-cases on states that are not removal: pinning (eviction never takes a pinned state)."""

from __future__ import annotations

from taidon_proxy.services.audit import Audit
from taidon_proxy.services.lookup import find_state
from taidon_proxy.store.metadata import StateRow
from taidon_proxy.store.metadata_api import MetadataStore


async def set_pinned(
    meta: MetadataStore, ref: str, pinned: bool, *, audit: Audit, actor: str
) -> StateRow:
    """Pin or unpin the state `ref` names (id, unique prefix or name); the row as it is now."""
    row = await find_state(meta, ref)
    await meta.set_pinned(row.id, pinned)
    audit.record("pin" if pinned else "unpin", actor=actor, state=row.id, alias=row.alias)
    return await find_state(meta, row.id)
