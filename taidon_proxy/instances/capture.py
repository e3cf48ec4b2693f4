"""A running instance's content now, as an unnamed state: checkpoint, freeze, commit, thaw.

Live content has no recipe identity: its state id only has to be unique and stable once
made. Named snapshots (services/snapshot.py) and template databases (virtual.py) use it.
"""

from __future__ import annotations

import secrets
import time

from taidon_proxy.instances.manager import Instance
from taidon_proxy.runtimes.base import InstanceRuntime
from taidon_proxy.runtimes.connect import connect
from taidon_proxy.store.ids import digest
from taidon_proxy.store.metadata import StateRow
from taidon_proxy.store.states import StateStore

CHECKPOINT_TIMEOUT_S = 60.0


async def capture(
    store: StateStore, runtime: InstanceRuntime, inst: Instance, *, why: str, label: str
) -> StateRow:
    """Commit `inst`'s clone as a child state of the one it was cloned from.

    `why` goes into the id (with randomness), `label` is what listings show. The server is
    frozen only for the commit; everything committed before is on disk first (CHECKPOINT).
    """
    handle = inst.handle
    conn = await connect(handle, database="postgres", timeout=CHECKPOINT_TIMEOUT_S)
    try:
        await conn.execute("CHECKPOINT", timeout=CHECKPOINT_TIMEOUT_S)
    finally:
        await conn.close()
    parent = await store.get(inst.state_id)
    now = time.time()
    row = StateRow(
        id=digest(inst.state_id, why, secrets.token_hex(16)),
        parent=inst.state_id, kind="snapshot", alias=inst.alias, label=label,
        backend=store.backend_name, engine=parent.engine if parent is not None else "",
        created=now, last_used=now, use_count=0, build_seconds=0.0, size_bytes=0,
        pinned=False, clean=False,
    )  # fmt: skip
    await runtime.freeze(handle)
    try:
        return await store.commit(inst.clone_id, row)
    finally:
        await runtime.thaw(handle)
