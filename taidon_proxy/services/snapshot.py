"""A live instance becomes a named state: checkpoint, freeze, snapshot its clone, thaw."""

from __future__ import annotations

import re
import time

import structlog

from taidon_proxy.instances.capture import capture
from taidon_proxy.instances.manager import Instance
from taidon_proxy.runtimes.base import InstanceRuntime
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.errors import Refusal, invalid
from taidon_proxy.store.metadata import SharedRecord, StateRow
from taidon_proxy.store.states import StateStore

log = structlog.get_logger("taidon.admin")

STATE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")


def check_name(name: str) -> str:
    if not STATE_NAME.match(name):
        raise invalid("name", "1-63 of A-Z a-z 0-9 _ . -, starting with a letter or _")
    return name


async def snapshot_instance(
    store: StateStore,
    runtime: InstanceRuntime,
    target: Instance | SharedRecord,
    name: str,
    *,
    audit: Audit,
    actor: str,
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
    started = time.monotonic()
    row = await capture(
        store, runtime, inst, why=f"snapshot {name}", label=f"snapshot {name} of {inst.id}"
    )
    await meta.set_name(name, row.id)
    audit.record(
        "snapshot", actor=actor, instance=inst.id, alias=inst.alias, label=inst.label,
        name=name, state=row.id,
    )  # fmt: skip
    log.info(
        "admin.snapshot",
        instance=inst.id,
        state=row.id[:12],
        name=name,
        paused_seconds=round(time.monotonic() - started, 3),
    )
    return row
