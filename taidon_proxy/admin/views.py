"""JSON shapes of the API's resources, built from the proxy's live objects and metadata rows."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taidon_proxy.instances.manager import Instance
    from taidon_proxy.net.session import ClientSession
    from taidon_proxy.prepare.jobs import Job, JobEvent
    from taidon_proxy.store.metadata import StateRow


def state_view(row: StateRow, names: list[str], instances: list[str]) -> dict[str, Any]:
    return {
        "id": row.id,
        "parent": row.parent,
        "kind": row.kind,
        "alias": row.alias,
        "label": row.label,
        "backend": row.backend,
        "engine": row.engine,
        "created": row.created,
        "last_used": row.last_used,
        "use_count": row.use_count,
        "build_seconds": round(row.build_seconds, 3),
        "size_bytes": row.size_bytes,
        "pinned": row.pinned,
        "clean": row.clean,
        "names": sorted(names),
        "instances": sorted(instances),
    }


def instance_view(inst: Instance, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "id": inst.id,
        "key": inst.key,
        "alias": inst.alias,
        "label": inst.label,
        "state": inst.state_id,
        "isolation": inst.isolation,
        "database": inst.database,
        "connections": len(inst.leases),
        "age_seconds": round(now - inst.created, 3),
        "idle_seconds": 0.0 if inst.leases else round(now - inst.last_active, 3),
        "ttl_seconds": inst.ttl,
        "stopping": inst.stopping,
    }


def session_id(session: ClientSession) -> str:
    # Stable for the session's life and reveals nothing (the cancel key stays private).
    return f"c-{id(session):x}"


def session_view(session: ClientSession) -> dict[str, Any]:
    lease = session.lease
    inst = lease.instance if lease is not None else None
    return {
        "id": session_id(session),
        "client": session.peer,
        "user": session.user,
        "database": session.route_desc,
        "alias": inst.alias if inst is not None else None,
        "instance": inst.id if inst is not None else None,
        "bytes_from_client": session.bytes_from_client,
        "bytes_to_client": session.bytes_to_client,
        "age_seconds": round(time.monotonic() - session.started, 3),
        "waiting": session.waiting_task is not None,
    }


def event_view(ev: JobEvent | tuple[int, float, str, str]) -> dict[str, Any]:
    if isinstance(ev, tuple):
        seq, ts, kind, message = ev
    else:
        seq, ts, kind, message = ev.seq, ev.ts, ev.kind, ev.message
    return {"seq": seq, "ts": ts, "kind": kind, "message": message}


def live_job_view(job: Job) -> dict[str, Any]:
    finished = job.events[-1].ts if job.done and job.events else None
    return {
        "id": job.id,
        "alias": job.alias,
        "status": job.status,
        "started": job.started,
        "finished": finished,
        "target": job.target,
        "error": job.error,
        "steps": [e.message for e in job.events if e.kind == "step.start"],
        "snapshots": sum(1 for e in job.events if e.kind == "snapshot"),
        "events": len(job.events),
    }


def stored_job_view(
    row: dict[str, Any], events: list[tuple[int, float, str, str]] | None = None
) -> dict[str, Any]:
    view = {k: row.get(k) for k in ("id", "alias", "status", "started", "finished", "target")}
    view["error"] = row.get("error")
    if events is not None:
        view["steps"] = [e[3] for e in events if e[2] == "step.start"]
        view["snapshots"] = sum(1 for e in events if e[2] == "snapshot")
        view["events"] = len(events)
    return view
