"""Use-cases on shared instances: reset one to its recipe's current state."""

from __future__ import annotations

from taidon_proxy.instances.keys import InstanceKey
from taidon_proxy.instances.manager import InstanceManager
from taidon_proxy.services.errors import Refusal


async def reset_shared(instances: InstanceManager, key: InstanceKey) -> None:
    """Throw the shared instance's clone away (running: its sessions end with 57P01; or kept);
    the next connection gets a fresh clone of the recipe's current state."""
    if not await instances.reset(key):
        raise Refusal("not_found", f"no shared instance {key} (running or kept)")
