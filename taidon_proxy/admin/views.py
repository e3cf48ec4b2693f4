"""JSON shapes of the API's resources, built from the proxy's live objects and metadata rows."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from taidon_proxy.store.metadata import SharedRecord

if TYPE_CHECKING:
    from taidon_proxy.instances.manager import Instance, InstanceManager
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


def instance_view(
    inst: Instance | SharedRecord, manager: InstanceManager | None = None, now: float | None = None
) -> dict[str, Any]:
    """A running instance, or a stopped shared one (a kept clone, no server)."""
    now = time.time() if now is None else now
    retention = manager.retention if manager is not None else None
    if isinstance(inst, SharedRecord):  # a kept clone, no server
        rec = inst
        expires = manager.expires_at(rec) if manager is not None else None
        return {
            "id": rec.clone_id,
            "key": rec.key,
            "alias": rec.alias,
            "label": rec.label,
            "state": rec.state_id,
            "isolation": "shared",
            "status": "stopped",
            "database": manager.database_for(rec.alias) if manager is not None else rec.alias,
            "connections": 0,
            "age_seconds": round(now - rec.created, 3),
            "idle_seconds": round(now - rec.last_used, 3),
            "last_used": rec.last_used,
            "ttl_seconds": None,
            "retention_seconds": retention or None,
            "expires_in_seconds": None if expires is None else round(max(0.0, expires - now), 3),
            "stopping": False,
        }
    live = inst
    shared = live.isolation == "shared"
    return {
        "id": live.id,
        "key": str(live.key),
        "alias": live.alias,
        "label": live.label,
        "state": live.state_id,
        "isolation": live.isolation,
        "status": live.status,
        "database": live.database,
        "connections": len(live.leases),
        "age_seconds": round(now - live.created, 3),
        "idle_seconds": 0.0 if live.leases else round(now - live.last_active, 3),
        "last_used": live.last_active,
        "ttl_seconds": live.ttl,
        "retention_seconds": (retention or None) if shared else None,
        "expires_in_seconds": None,
        "stopping": live.stopping,
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
