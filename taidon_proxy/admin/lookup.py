"""Finding what a request names: states by name or id prefix, instances, jobs (404/409 rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from taidon_proxy.admin.errors import ambiguous, not_found
from taidon_proxy.store.metadata import SharedRecord

if TYPE_CHECKING:
    from taidon_proxy.app import Proxy
    from taidon_proxy.instances.manager import Instance
    from taidon_proxy.store.metadata import StateRow

SHOWN_CANDIDATES = 10


def unique(kind: str, ref: str, ids: list[str]) -> str:
    """The one id equal to ref, else the one starting with it; 404 or 409 (with candidates)."""
    if ref in ids:
        return ref
    found = sorted(i for i in ids if i.startswith(ref)) if ref else []
    if not found:
        raise not_found(kind, ref)
    if len(found) > 1:
        raise ambiguous(kind, ref, found[:SHOWN_CANDIDATES])
    return found[0]


async def find_state(proxy: Proxy, ref: str) -> StateRow:
    matches = await proxy.meta.resolve_state(ref)
    if not matches:
        raise not_found("state", ref)
    if len(matches) > 1:
        raise ambiguous("state", ref, matches)
    row = await proxy.meta.get_state(matches[0])
    if row is None:  # removed between the two reads
        raise not_found("state", ref)
    return row


def find_instance(proxy: Proxy, ref: str) -> Instance | SharedRecord:
    """By id (or unique id prefix), else by ALIAS[:LABEL] of a shared instance; running
    instances and stopped shared ones (kept clones) alike."""
    assert proxy.instances is not None
    live: dict[str, Instance | SharedRecord] = {
        i.id: i for i in proxy.instances.instances.values() if not i.stopping
    }
    live.update({r.clone_id: r for r in proxy.instances.kept.values()})
    alias, sep, label = ref.partition(":")
    key = f"{alias}:{label if sep else 'default'}"
    shared = [
        i
        for i in live.values()
        if i.key == key and (isinstance(i, SharedRecord) or i.isolation == "shared")
    ]
    if shared and ref not in live:
        return shared[0]
    return live[unique("instance", ref, list(live))]
