"""A live instance becomes a named state: checkpoint, freeze, snapshot its clone, thaw."""

from __future__ import annotations

import re
import secrets
import time

import structlog

from taidon_proxy.instances.manager import Instance
from taidon_proxy.runtimes.base import InstanceRuntime
from taidon_proxy.runtimes.connect import connect
from taidon_proxy.services.errors import Refusal, invalid
from taidon_proxy.store.ids import digest
from taidon_proxy.store.metadata import SharedRecord, StateRow
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.admin")

STATE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
CHECKPOINT_TIMEOUT = 60.0


def check_name(name: str) -> str:
    if not STATE_NAME.match(name):
        raise invalid("name", "1-63 of A-Z a-z 0-9 _ . -, starting with a letter or _")
    return name


async def snapshot_instance(
    store: StateStore, runtime: InstanceRuntime, target: Instance | SharedRecord, name: str
) -> StateRow:
    """The instance's content now, as a state named `name` (clients open it as state:NAME)."""
    if isinstance(target, SharedRecord):
        raise Refusal(
            "stopped", f"instance {target.clone_id} is stopped; connect to {target.key} first"
        )
    inst = target
    meta = store.meta
    check_name(name)
    if not store.backend.capabilities.live_snapshot or not runtime.capabilities.can_freeze:
        raise Refusal(
            "unsupported",
            f"backend {store.backend_name} with runtime {runtime.capabilities.name}"
            " cannot snapshot a running instance",
        )
    existing = (await meta.names()).get(name)
    if existing is not None:
        raise Refusal("conflict", f'the name "{name}" is taken', state=existing)
    handle = inst.handle
    # Make everything committed durable on disk, so the frozen files are a consistent cluster.
    conn = await connect(handle, database="postgres", timeout=CHECKPOINT_TIMEOUT)
    try:
        await conn.execute("CHECKPOINT", timeout=CHECKPOINT_TIMEOUT)
    finally:
        await conn.close()
    parent = await meta.get_state(inst.state_id)
    engine = parent.engine if parent is not None else ""
    # Live content has no recipe identity: the id only has to be unique and stable once made.
    state_id = digest(inst.state_id, "snapshot", name, secrets.token_hex(16))
    now = time.time()
    row = StateRow(
        id=state_id,
        parent=inst.state_id,
        kind="snapshot",
        alias=inst.alias,
        label=f"snapshot {name} of {inst.id}",
        backend=store.backend_name,
        engine=engine,
        created=now,
        last_used=now,
        use_count=0,
        build_seconds=0.0,
        size_bytes=0,
        pinned=False,
        clean=False,
    )
    started = time.monotonic()
    await runtime.freeze(handle)
    try:
        row = await store.commit(inst.clone_id, row)
    finally:
        await runtime.thaw(handle)
    await meta.set_name(name, state_id)
    log.info(
        "admin.snapshot",
        instance=inst.id,
        state=state_id[:12],
        name=name,
        paused_seconds=round(time.monotonic() - started, 3),
    )
    return row
