"""The kubernetes runtime, the gateway's side: a TaidonInstance per instance, its lease, its end.

The controller (taidon_proxy/k8s/controller.py) turns each TaidonInstance into a claim cloned
from the state's VolumeSnapshot, a Secret and a pod. This runtime creates the TaidonInstance,
waits until it runs, reads the per-instance password from the Secret (the gateway holds it; a
client never sees it), renews the lease while it holds the instance and deletes it at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from taidon_proxy.k8s import podspec
from taidon_proxy.k8s.api import INSTANCES, SECRETS, KubeApi, KubeError
from taidon_proxy.runtimes.base import (
    EngineInfo,
    InstanceHandle,
    InstanceStartError,
    RuntimeCapabilities,
    RuntimeError_,
)

log = structlog.get_logger(__name__)

POLL_INTERVAL = 0.25
CAPACITY_SQLSTATE = "53300"  # too_many_connections: what the proxy's own CapacityError uses


@dataclass(frozen=True)
class KubeInstance:
    """A running instance pod, as the gateway connects to it (over the pod network)."""

    name: str
    namespace: str
    host: str
    port: int
    user: str
    password: str


def _stamp() -> str:
    """RFC 3339 with milliseconds: a lease of a few seconds is not rounded away."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _name_for(alias: str) -> str:
    base = re.sub(r"[^a-z0-9-]", "-", alias.lower()).strip("-")[:28].strip("-") or "db"
    return podspec.check_name(f"{base}-{secrets.token_hex(4)}")


def _conditions_text(status: Mapping[str, Any]) -> str:
    return "; ".join(
        f"{c.get('type')}={c.get('status')} ({c.get('reason')}: {c.get('message')})"
        for c in status.get("conditions") or []
    )


class KubernetesRuntime:
    """Instances as TaidonInstance objects in one namespace, reconciled by the controller."""

    def __init__(
        self,
        *,
        namespace: str,
        image: str,
        storage_class: str | None = None,
        snapshot_class: str | None = None,
        api_url: str | None = None,
        lease_holder: str | None = None,
        lease_seconds: float = 60.0,
        start_timeout: float = 300.0,
        engine_version: str = "15",
        api: KubeApi | None = None,
    ) -> None:
        podspec.check_name(namespace, "namespace")
        if lease_seconds <= 0 or start_timeout <= 0:
            raise RuntimeError_("runtime lease_seconds and start_timeout must be positive")
        self.namespace = namespace
        self.image = image
        # The controller's settings name these too; kept here so a config names one runtime.
        self.storage_class = storage_class
        self.snapshot_class = snapshot_class
        self.lease_holder = lease_holder or socket.gethostname()
        self.lease_seconds = lease_seconds
        self.start_timeout = start_timeout
        self.engine_version = engine_version
        self.api = api or (KubeApi(api_url) if api_url else KubeApi.in_cluster())
        self._held: dict[str, KubeInstance] = {}
        self._renewer: asyncio.Task[None] | None = None

    @property
    def capabilities(self) -> RuntimeCapabilities:
        return RuntimeCapabilities(name="kubernetes", can_freeze=False)

    async def engine(self) -> EngineInfo:
        major = int(self.engine_version.split(".")[0])
        return EngineInfo(version=self.engine_version, major=major, source=f"k8s:{self.image}")

    # -- the gateway's calls ------------------------------------------------------------------

    async def open_instance(
        self,
        *,
        state_id: str,
        alias: str,
        label: str = "",
        isolation: str = "connection",
        team: str = "",
        user: str = "",
        ttl_seconds: int | None = None,
        idle_ttl_seconds: int | None = None,
    ) -> KubeInstance:
        """Create a TaidonInstance of `state_id` and return its endpoint once it runs."""
        podspec.state_object_name(state_id)  # a malformed id is refused before anything exists
        name = _name_for(alias)
        spec: dict[str, Any] = {
            "stateId": state_id,
            "alias": alias,
            "label": label,
            "isolation": isolation,
            "team": team,
            "user": user,
            "leaseHolder": self.lease_holder,
            "leaseRenewedAt": _stamp(),
        }
        if ttl_seconds is not None:
            spec["ttlSeconds"] = ttl_seconds
        if idle_ttl_seconds is not None:
            spec["idleTtlSeconds"] = idle_ttl_seconds
        body = {
            "apiVersion": podspec.API_VERSION,
            "kind": "TaidonInstance",
            "metadata": {"name": name, "labels": podspec.labels("gateway")},
            "spec": spec,
        }
        await self.api.create(INSTANCES, self.namespace, body)
        try:
            instance = await self._wait_running(name)
        except BaseException:
            with contextlib.suppress(KubeError):
                await self.api.delete(INSTANCES, self.namespace, name)
            raise
        self._held[name] = instance
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_loop())
        log.info("k8s.instance.opened", instance=name, host=instance.host)
        return instance

    async def _wait_running(self, name: str) -> KubeInstance:
        status: Mapping[str, Any] = {}
        try:
            async with asyncio.timeout(self.start_timeout):
                while True:
                    obj = await self.api.get(INSTANCES, self.namespace, name)
                    if obj is None:
                        raise InstanceStartError(
                            f"TaidonInstance {name} was deleted while starting"
                        )
                    status = obj.get("status") or {}
                    phase = status.get("phase")
                    if phase == "Running" and status.get("endpoint"):
                        return await self._connectable(name, status["endpoint"])
                    if phase in ("Failed", "Expired"):
                        raise self._refusal(name, status)
                    await asyncio.sleep(POLL_INTERVAL)
        except TimeoutError:
            phase = status.get("phase") or "none"
            raise InstanceStartError(
                f"TaidonInstance {name} did not run within {self.start_timeout:.0f} s "
                f"(phase {phase}): {_conditions_text(status) or 'no status'}"
            ) from None

    @staticmethod
    def _refusal(name: str, status: Mapping[str, Any]) -> RuntimeError_:
        for c in status.get("conditions") or []:
            if c.get("type") == "QuotaExceeded" and c.get("status") == "True":
                return RuntimeError_(str(c.get("message")), sqlstate=CAPACITY_SQLSTATE)
        return InstanceStartError(
            f"TaidonInstance {name} is {status.get('phase')}: {_conditions_text(status)}"
        )

    async def _connectable(self, name: str, endpoint: Mapping[str, Any]) -> KubeInstance:
        secret = await self.api.get(SECRETS, self.namespace, podspec.secret_name(name))
        if secret is None or podspec.SECRET_PASSWORD not in (secret.get("data") or {}):
            raise InstanceStartError(f"TaidonInstance {name} runs but has no credentials Secret")
        password = base64.b64decode(secret["data"][podspec.SECRET_PASSWORD]).decode()
        return KubeInstance(
            name=name,
            namespace=self.namespace,
            host=str(endpoint["host"]),
            port=int(endpoint.get("port") or podspec.PORT),
            user=podspec.SUPERUSER,
            password=password,
        )

    async def renew(self, name: str) -> None:
        """Renew the lease; an instance the controller expired is an error."""
        obj = await self.api.patch(
            INSTANCES, self.namespace, name, {"spec": {"leaseRenewedAt": _stamp()}}
        )
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Expired", "Failed"):
            self._held.pop(name, None)
            raise InstanceStartError(f"TaidonInstance {name} is {phase}")

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_seconds / 3)
            for name in list(self._held):
                try:
                    await self.renew(name)
                except RuntimeError_ as exc:
                    log.warning("k8s.lease.renew_failed", instance=name, error=str(exc))

    async def release(self, name: str) -> None:
        """Delete the TaidonInstance (the controller deletes its pod, claim and Secret)."""
        self._held.pop(name, None)
        await self.api.delete(INSTANCES, self.namespace, name)
        log.info("k8s.instance.released", instance=name)

    # -- the InstanceRuntime protocol ---------------------------------------------------------

    async def init_cluster(self, pgdata: Path, settings: Mapping[str, str]) -> None:
        raise RuntimeError_(
            "the kubernetes runtime does not initdb on the gateway: states are built by "
            "builder pods and taken as VolumeSnapshots"
        )

    async def start(
        self, instance_id: str, pgdata: Path, settings: Mapping[str, str] | None = None
    ) -> InstanceHandle:
        raise RuntimeError_(
            "the kubernetes runtime starts instances from a state (open_instance), not on a "
            "data directory of the gateway"
        )

    async def stop(self, handle: InstanceHandle, *, mode: str = "fast") -> None:
        await self.release(handle.instance_id)

    async def wait_exit(self, handle: InstanceHandle) -> int:
        """Wait until the instance stops running (deleted, expired, failed); 0 when deleted."""
        while True:
            obj = await self.api.get(INSTANCES, self.namespace, handle.instance_id)
            if obj is None:
                return 0
            if (obj.get("status") or {}).get("phase") in ("Failed", "Expired"):
                return 1
            await asyncio.sleep(POLL_INTERVAL * 4)

    async def freeze(self, handle: InstanceHandle) -> None:
        raise RuntimeError_("the kubernetes runtime cannot freeze an instance pod")

    async def thaw(self, handle: InstanceHandle) -> None:
        raise RuntimeError_("the kubernetes runtime cannot freeze an instance pod")

    async def reap(self, keep: set[str]) -> list[str]:
        """Delete this gateway's TaidonInstances (by lease holder) not in `keep`."""
        reaped = []
        for obj in await self.api.list(INSTANCES, self.namespace):
            name = obj["metadata"]["name"]
            holder = (obj.get("spec") or {}).get("leaseHolder")
            if holder == self.lease_holder and name not in keep:
                await self.release(name)
                reaped.append(name)
        return reaped

    async def close(self) -> None:
        """Release every instance this object holds; stop renewing; close the client."""
        for name in list(self._held):
            try:
                await self.release(name)
            except RuntimeError_ as exc:
                log.warning("k8s.close.release_failed", instance=name, error=str(exc))
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.api.close()
