"""What the controller does to one TaidonInstance or TaidonState: idempotent, restart-safe steps."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from taidon_proxy.k8s import podspec
from taidon_proxy.k8s.api import (
    INSTANCES,
    PODS,
    PVCS,
    SECRETS,
    STATES,
    VOLUME_SNAPSHOTS,
    AlreadyExists,
    Kind,
    KubeApi,
    matches,
)
from taidon_proxy.runtimes.base import RuntimeError_

log = structlog.get_logger(__name__)

LIVE_PHASES = frozenset({"Pending", "Running"})
GIB = 2**30


@dataclass(frozen=True)
class ControllerSettings:
    image: podspec.PodImage
    storage_class: str | None = None
    snapshot_class: str | None = None
    min_storage_gib: int = 1
    lease_seconds: float = 60.0  # a gateway that renews no lease for this long is gone
    interval: float = 10.0  # how often each object is looked at again
    team_quotas: Mapping[str, int] = field(default_factory=dict)  # instances at once
    default_team_quota: int | None = None  # None: teams not named are not limited
    resources: podspec.Resources = field(default_factory=podspec.Resources)
    now: Callable[[], datetime] = lambda: datetime.now(UTC)

    def quota(self, team: str) -> int | None:
        return self.team_quotas.get(team, self.default_team_quota)


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def conditions(
    old: list[dict[str, Any]], new: Mapping[str, tuple[bool, str, str]], now: datetime
) -> list[dict[str, Any]]:
    """The status conditions `new` (type → status, reason, message), keeping the transition
    times of those whose status did not change, and the other old ones as they were."""
    before = {c.get("type"): c for c in old}
    out = [c for c in old if c.get("type") not in new]
    for kind, (ok, reason, message) in new.items():
        status = "True" if ok else "False"
        prev = before.get(kind)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status else None
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or _stamp(now),
            }
        )
    return sorted(out, key=lambda c: str(c["type"]))


def _owner(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    meta = obj.get("metadata", {})
    if not meta.get("uid"):
        return []
    return [
        {
            "apiVersion": podspec.API_VERSION,
            "kind": "TaidonInstance",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


class Reconciler:
    """The controller's use-cases over one API client; every step may run again safely."""

    def __init__(self, api: KubeApi, settings: ControllerSettings) -> None:
        self.api = api
        self.settings = settings
        # Admission (the quota check and the mark that counts) is one step at a time.
        self._admission = asyncio.Lock()
        # One pass at a time per instance: kopf's create handler and its timer may overlap.
        self._passes: dict[tuple[str, str], asyncio.Lock] = {}

    # -- objects we own -----------------------------------------------------------------------

    async def _ensure(
        self, kind: Kind, namespace: str, manifest: dict[str, Any], owner: Mapping[str, Any]
    ) -> tuple[dict[str, Any] | None, str]:
        """Create the object, or adopt ours by its labels; (object, "") or (None, why not)."""
        name = manifest["metadata"]["name"]
        existing = await self.api.get(kind, namespace, name)
        if existing is None:
            body = {**manifest, "metadata": {**manifest["metadata"]}}
            if refs := _owner(owner):
                body["metadata"]["ownerReferences"] = refs
            try:
                return await self.api.create(kind, namespace, body), ""
            except AlreadyExists:  # created between our get and create (a restart's race)
                existing = await self.api.get(kind, namespace, name)
                if existing is None:
                    return None, f"{kind.kind} {name} appeared and vanished; retrying"
        if matches(existing, manifest["metadata"]["labels"]):
            return existing, ""
        return None, f"{kind.kind} {name} exists and is not ours (labels differ)"

    async def _delete_owned(self, namespace: str, instance: str) -> None:
        await self.api.delete(PODS, namespace, podspec.pod_name(instance))
        await self.api.delete(PVCS, namespace, podspec.pvc_name(instance))
        await self.api.delete(SECRETS, namespace, podspec.secret_name(instance))

    async def _set_status(
        self, body: Mapping[str, Any], status: Mapping[str, Any], new: Mapping[str, Any]
    ) -> dict[str, Any]:
        meta = body["metadata"]
        old = list(status.get("conditions") or [])
        patch = {k: v for k, v in status.items() if k != "conditions"}
        patch.update({k: v for k, v in new.items() if k != "conditions"})
        patch["conditions"] = conditions(old, new.get("conditions", {}), self.settings.now())
        if {k: v for k, v in patch.items() if v is not None} == dict(status):
            return patch  # nothing changed: no write, no event
        await self.api.patch(
            INSTANCES, meta["namespace"], meta["name"], {"status": patch}, status=True
        )
        return patch

    # -- admission ----------------------------------------------------------------------------

    async def _admit(self, body: Mapping[str, Any]) -> str | None:
        """Count the team's live instances cluster-wide; mark this one admitted, or refuse."""
        meta, spec = body["metadata"], body.get("spec") or {}
        team = str(spec.get("team") or "")
        limit = self.settings.quota(team) if team else None
        async with self._admission:
            if limit is not None:
                held = [
                    item
                    for item in await self.api.list(INSTANCES, None)
                    if (item.get("spec") or {}).get("team") == team
                    and (item.get("status") or {}).get("phase") in LIVE_PHASES
                    and (item["metadata"]["name"], item["metadata"].get("namespace"))
                    != (meta["name"], meta["namespace"])
                ]
                if len(held) >= limit:
                    return f"team {team!r} holds {len(held)} of {limit} instances at once"
            await self._set_status(
                body,
                body.get("status") or {},
                {
                    "phase": "Pending",
                    "podName": podspec.pod_name(meta["name"]),
                    "pvcName": podspec.pvc_name(meta["name"]),
                    "conditions": {"QuotaExceeded": (False, "Admitted", "within the team quota")},
                },
            )
        return None

    # -- instances ----------------------------------------------------------------------------

    def expiry(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        """(reason, message) when the instance's lease or TTL has run out."""
        spec = body.get("spec") or {}
        now = self.settings.now()
        created = parse_time(body["metadata"].get("creationTimestamp"))
        ttl = spec.get("ttlSeconds")
        if ttl and created and now >= created + timedelta(seconds=float(ttl)):
            return "TTLExpired", f"created {_stamp(created)}, ttl {ttl} s"
        renewed = parse_time(spec.get("leaseRenewedAt")) or created
        if renewed and now >= renewed + timedelta(seconds=self.settings.lease_seconds):
            holder = spec.get("leaseHolder") or "(none)"
            return (
                "LeaseExpired",
                f"lease of {holder} last renewed {_stamp(renewed)}, "
                f"not within {self.settings.lease_seconds:.0f} s",
            )
        return None

    async def expire(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        meta = body["metadata"]
        await self._delete_owned(meta["namespace"], meta["name"])
        await self._set_status(
            body,
            body.get("status") or {},
            {
                "phase": "Expired",
                "endpoint": None,
                "conditions": {
                    "Expired": (True, reason, message),
                    "PodReady": (False, reason, "pod deleted"),
                },
            },
        )
        log.info("k8s.instance.expired", instance=meta["name"], reason=reason)

    async def _inputs(self, body: Mapping[str, Any]) -> tuple[podspec.InstanceInputs | None, str]:
        meta, spec = body["metadata"], body.get("spec") or {}
        state_id = str(spec.get("stateId") or "")
        state_name = podspec.state_object_name(state_id)
        state = await self.api.get(STATES, meta["namespace"], state_name)
        if state is None:
            return None, f"no TaidonState {state_name} in {meta['namespace']}"
        if not (state.get("status") or {}).get("readyToUse"):
            return None, f"TaidonState {state_name} is not ready to use yet"
        sspec = state.get("spec") or {}
        size = int(sspec.get("sizeBytes") or 0)
        gib = max(self.settings.min_storage_gib, math.ceil(2 * size / GIB))
        return podspec.InstanceInputs(
            name=meta["name"],
            namespace=meta["namespace"],
            image=self.settings.image,
            snapshot_name=str(sspec.get("snapshotName") or state_name),
            storage_size=f"{gib}Gi",
            storage_class=self.settings.storage_class,
            state_id=state_id,
            team=str(spec.get("team") or ""),
            resources=self.settings.resources,
        ), ""

    async def reconcile_instance(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """One pass over an instance: admit, expire, make or adopt its objects, report."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        lock = self._passes.setdefault(key, asyncio.Lock())
        async with lock:
            # Fresh from the server: a pass that waited may have changed it.
            fresh = await self.api.get(INSTANCES, *key)
            if fresh is None:
                self._passes.pop(key, None)
                return dict(body.get("status") or {})
            return await self._pass(fresh)

    async def _pass(self, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        phase = status.get("phase")
        if phase in ("Expired", "Failed"):
            return status
        try:
            podspec.check_name(meta["name"])
            podspec.state_object_name(str((body.get("spec") or {}).get("stateId") or ""))
        except RuntimeError_ as exc:
            return await self._set_status(
                body,
                status,
                {"phase": "Failed", "conditions": {"Valid": (False, "Invalid", str(exc))}},
            )
        if phase is None:
            refused = await self._admit(body)
            if refused is not None:
                log.info("k8s.instance.refused", instance=meta["name"], why=refused)
                return await self._set_status(
                    body,
                    status,
                    {
                        "phase": "Failed",
                        "conditions": {"QuotaExceeded": (True, "QuotaExceeded", refused)},
                    },
                )
            fresh = await self.api.get(INSTANCES, meta["namespace"], meta["name"])
            if fresh is None:
                return status
            body, status = fresh, dict(fresh.get("status") or {})
        if expired := self.expiry(body):
            await self.expire(body, *expired)
            return status
        inp, waiting = await self._inputs(body)
        if inp is None:
            return await self._set_status(
                body, status, {"conditions": {"PVCBound": (False, "StateNotReady", waiting)}}
            )
        secret, why = await self.api.get(SECRETS, inp.namespace, podspec.secret_name(inp.name)), ""
        if secret is None:
            creds = podspec.Credentials.make(secrets.token_urlsafe(24), os.urandom(16))
            secret, why = await self._ensure(
                SECRETS, inp.namespace, podspec.secret_manifest(inp, creds), body
            )
        pvc, why_pvc = await self._ensure(PVCS, inp.namespace, podspec.pvc_manifest(inp), body)
        pod, why_pod = await self._ensure(
            PODS, inp.namespace, podspec.instance_pod_manifest(inp), body
        )
        problem = why or why_pvc or why_pod
        if problem:
            return await self._set_status(
                body,
                status,
                {"phase": "Failed", "conditions": {"PodReady": (False, "NameTaken", problem)}},
            )
        assert pvc is not None and pod is not None
        return await self._report(body, status, pvc, pod)

    async def _report(
        self,
        body: Mapping[str, Any],
        status: dict[str, Any],
        pvc: dict[str, Any],
        pod: dict[str, Any],
    ) -> dict[str, Any]:
        bound = (pvc.get("status") or {}).get("phase") == "Bound"
        pod_status = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in pod_status.get("conditions") or []
        )
        pod_phase = pod_status.get("phase") or "Pending"
        new: dict[str, Any] = {
            "conditions": {
                "PVCBound": (
                    bound,
                    "Bound" if bound else "Pending",
                    f"claim {pvc['metadata']['name']}",
                ),
                "PodReady": (ready, "Ready" if ready else pod_phase, f"pod phase {pod_phase}"),
            }
        }
        if pod_phase in ("Failed", "Succeeded"):
            new["phase"] = "Failed"
            new["endpoint"] = None
        elif ready and pod_status.get("podIP"):
            new["phase"] = "Running"
            new["endpoint"] = {"host": pod_status["podIP"], "port": podspec.PORT}
        return await self._set_status(body, status, new)

    async def delete_instance(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        self._passes.pop((meta["namespace"], meta["name"]), None)
        await self._delete_owned(meta["namespace"], meta["name"])

    async def sweep_orphan(self, kind: Kind, body: Mapping[str, Any]) -> bool:
        """Delete a labelled instance pod or claim whose TaidonInstance is gone; True if so."""
        meta = body["metadata"]
        instance = (meta.get("labels") or {}).get(podspec.LABEL_INSTANCE)
        if not instance or await self.api.get(INSTANCES, meta["namespace"], instance) is not None:
            return False
        await self._delete_owned(meta["namespace"], instance)
        log.info("k8s.orphan.deleted", kind=kind.kind, name=meta["name"], instance=instance)
        return True

    # -- states -------------------------------------------------------------------------------

    async def reconcile_state(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A TaidonState: its VolumeSnapshot of the builder's claim (made or adopted), ready?"""
        meta, spec = body["metadata"], body.get("spec") or {}
        name = str(spec.get("snapshotName") or meta["name"])
        snapshot = await self.api.get(VOLUME_SNAPSHOTS, meta["namespace"], name)
        if snapshot is None:
            manifest = podspec.volume_snapshot_manifest(
                name=name,
                namespace=meta["namespace"],
                source_pvc=podspec.builder_pvc_name(meta["name"]),
                snapshot_class=self.settings.snapshot_class,
            )
            try:
                snapshot = await self.api.create(VOLUME_SNAPSHOTS, meta["namespace"], manifest)
            except AlreadyExists:
                snapshot = await self.api.get(VOLUME_SNAPSHOTS, meta["namespace"], name) or {}
        snap_status = snapshot.get("status") or {}
        ready = bool(snap_status.get("readyToUse"))
        error = (snap_status.get("error") or {}).get("message")
        old = dict(body.get("status") or {})
        reason = "SnapshotReady" if ready else ("SnapshotFailed" if error else "SnapshotPending")
        status = {
            "readyToUse": ready,
            "conditions": conditions(
                list(old.get("conditions") or []),
                {"Ready": (ready, reason, error or f"VolumeSnapshot {name}")},
                self.settings.now(),
            ),
        }
        if status != {k: old.get(k) for k in status}:
            await self.api.patch(
                STATES, meta["namespace"], meta["name"], {"status": status}, status=True
            )
        return status
