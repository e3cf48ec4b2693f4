"""Use-cases on instances: reset a shared one to its recipe's current state; remove one."""

from __future__ import annotations

from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.instances.manager import Instance, InstanceManager
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.errors import Refusal
from taidon_proxy.store.metadata import SharedRecord


async def reset_shared(
    instances: InstanceManager, key: InstanceKey, *, audit: Audit, actor: str
) -> None:
    """Throw the shared instance's clone away (running: its sessions end with 57P01; or kept);
    the next connection gets a fresh clone of the recipe's current state."""
    if not await instances.reset(key):
        raise Refusal("not_found", f"no shared instance {key} (running or kept)")
    audit.record("reset", actor=actor, alias=key.alias, label=key.label, target=str(key))


async def remove_instance(
    instances: InstanceManager, target: Instance | SharedRecord, *, audit: Audit, actor: str
) -> None:
    """Stop an instance now (its clients get 57P01) and remove its clone (a stopped shared
    instance's kept clone too)."""
    await instances.remove(target, "removed by admin")
    if isinstance(target, SharedRecord):
        audit.record(
            "instance_removal", actor=actor, instance=target.clone_id, alias=target.alias,
            label=target.label, status="stopped",
        )  # fmt: skip
    else:
        audit.record(
            "instance_removal", actor=actor, instance=target.id, alias=target.alias,
            label=target.label, status="running",
        )  # fmt: skip
