"""Finding what a caller names: states by name or id prefix, instances, jobs."""

from __future__ import annotations

from taidon_proxy.instances.keys import InstanceKey, Isolation
from taidon_proxy.instances.manager import Instance, InstanceManager
from taidon_proxy.services.errors import SHOWN_CANDIDATES, ambiguous, not_found
from taidon_proxy.store.metadata import SharedRecord, StateRow
from taidon_proxy.store.metadata_api import MetadataStore


def unique(kind: str, ref: str, ids: list[str]) -> str:
    """The one id equal to ref, else the one starting with it; not_found or ambiguous."""
    if ref in ids:
        return ref
    found = sorted(i for i in ids if i.startswith(ref)) if ref else []
    if not found:
        raise not_found(kind, ref)
    if len(found) > 1:
        raise ambiguous(kind, ref, found[:SHOWN_CANDIDATES])
    return found[0]


async def find_state(meta: MetadataStore, ref: str) -> StateRow:
    matches = await meta.resolve_state(ref)
    if not matches:
        raise not_found("state", ref)
    if len(matches) > 1:
        raise ambiguous("state", ref, matches)
    row = await meta.get_state(matches[0])
    if row is None:  # removed between the two reads
        raise not_found("state", ref)
    return row


def find_instance(instances: InstanceManager, ref: str) -> Instance | SharedRecord:
    """By id (or unique id prefix), else by ALIAS[:LABEL] of a shared instance; running
    instances and stopped shared ones (kept clones) alike."""
    live: dict[str, Instance | SharedRecord] = {
        i.id: i for i in instances.instances.values() if not i.stopping
    }
    live.update({r.clone_id: r for r in instances.kept.values()})
    alias, sep, label = ref.partition(":")
    key = InstanceKey.recipe(alias, label if sep else "default", Isolation.SHARED)
    shared = [
        i
        for i in live.values()
        if (i.key == str(key) if isinstance(i, SharedRecord) else i.key == key)
    ]
    if shared and ref not in live:
        return shared[0]
    return live[unique("instance", ref, list(live))]
