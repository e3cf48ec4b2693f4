"""A Kubernetes API stand-in (kmock's emulator) and the controller running against it.

No API server, kubelet or CSI driver can run here. `kube_standin` is kmock's in-memory
Kubernetes emulator on a loopback port: it stores objects, serves get/list/watch/patch/delete
and discovery, and knows nothing of what a cluster would do on its own. What a cluster's other
parts would do, the tests do by hand and say so: `play_kubelet` (a pod becomes Ready with an
IP), `play_volume_binder` (a claim becomes Bound), `play_snapshotter` (a VolumeSnapshot
becomes readyToUse). The stand-in adds what the API server adds: the namespace from the URL,
a uid and a creationTimestamp on create, a new resourceVersion on every write. It does not
filter lists by label (our client filters again) and does not delete owned objects (the
controller deletes them itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import kmock
import kopf
import pytest_asyncio

from taidon_proxy.k8s import controller, podspec
from taidon_proxy.k8s.api import PODS, PVCS, VOLUME_SNAPSHOTS, KubeApi
from taidon_proxy.k8s.reconcile import ControllerSettings

T = TypeVar("T")
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]
RESOURCES = {
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, []),
    "v1/namespaces": ("Namespace", False, []),
    "v1/pods": ("Pod", True, ["status"]),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True, ["status"]),
    "v1/secrets": ("Secret", True, []),
    "v1/events": ("Event", True, []),
    "events.k8s.io/v1/events": ("Event", True, []),
    "snapshot.storage.k8s.io/v1/volumesnapshots": ("VolumeSnapshot", True, ["status"]),
    "taidon.dev/v1alpha1/taidoninstances": ("TaidonInstance", True, ["status"]),
    "taidon.dev/v1alpha1/taidonstates": ("TaidonState", True, ["status"]),
}


class KubeStandin(kmock.KubernetesEmulator):
    """kmock's emulator, plus the metadata an API server sets (namespace, uid, versions)."""

    versions = itertools.count(1)

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.action == kmock.action.CREATE:
            meta = request.data.setdefault("metadata", {})
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", stamp())
            meta["resourceVersion"] = str(next(self.versions))
        elif request.resource is not None and request.action == kmock.action.UPDATE:
            # Every write makes a new resourceVersion (kopf's JSON patches test the old one).
            version = str(next(self.versions))
            if isinstance(request.data, list):
                op = {"op": "add", "path": "/metadata/resourceVersion", "value": version}
                request.data.append(op)
            elif isinstance(request.data, dict):
                request.data.setdefault("metadata", {})["resourceVersion"] = version
        return await super()._handle(request)


def stamp(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest_asyncio.fixture
async def kube_standin() -> AsyncIterator[KubeStandin]:
    """A fresh Kubernetes API stand-in on a loopback port, with our resource types known."""
    async with KubeStandin() as standin, kmock.Server(standin, host="127.0.0.1"):
        for key, (kind, namespaced, sub) in RESOURCES.items():
            standin.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS, subresources=sub
            )
        yield standin


def standin_api(standin: KubeStandin) -> KubeApi:
    # A connection kept alive across a controller's stop was seen to hang on the stand-in's
    # server: every request gets its own connection here.
    return KubeApi(str(standin.url), keepalive=False)


@contextlib.asynccontextmanager
async def running_controller(
    standin: KubeStandin, settings: ControllerSettings
) -> AsyncIterator[None]:
    """The real controller (kopf) against the stand-in, stopped on exit."""
    url = str(standin.url)

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    stop = asyncio.Event()
    task = asyncio.create_task(
        controller.run(settings, api_factory=lambda: standin_api(standin), login=login, stop=stop)
    )
    try:
        await asyncio.sleep(0.5)  # discovery and the first listings
        if task.done():
            task.result()
        yield
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


def controller_settings(**overrides: Any) -> ControllerSettings:
    values: dict[str, Any] = {
        "image": podspec.PodImage("taidon/postgres:15"),
        "storage_class": "csi-standin",
        "snapshot_class": "csi-snap-standin",
        "interval": 0.5,
        "lease_seconds": 30.0,
    }
    values.update(overrides)
    return ControllerSettings(**values)


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 15) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")


async def play_kubelet(api: KubeApi, namespace: str, pod: str, ip: str = "10.0.0.7") -> None:
    """What a kubelet would report: the pod runs and its readiness probe passes."""
    await api.patch(
        PODS, namespace, pod,
        {"status": {"phase": "Running", "podIP": ip,
                    "conditions": [{"type": "Ready", "status": "True"}]}},
        status=True,
    )  # fmt: skip


async def play_volume_binder(api: KubeApi, namespace: str, pvc: str) -> None:
    await api.patch(PVCS, namespace, pvc, {"status": {"phase": "Bound"}}, status=True)


async def play_snapshotter(api: KubeApi, namespace: str, name: str) -> None:
    await api.patch(
        VOLUME_SNAPSHOTS, namespace, name,
        {"status": {"readyToUse": True, "restoreSize": "1Gi"}}, status=True,
    )  # fmt: skip
