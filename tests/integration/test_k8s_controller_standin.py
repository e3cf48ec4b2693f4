"""The controller (real kopf, real handlers) against the Kubernetes API stand-in (kmock).

What a cluster's kubelet, volume binder and CSI snapshotter would do, the tests play by hand
(tests/k8s_standin.py says what the stand-in does and does not do).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taidon_proxy.k8s import podspec
from taidon_proxy.k8s.api import INSTANCES, PODS, PVCS, SECRETS, STATES, VOLUME_SNAPSHOTS, KubeApi
from taidon_proxy.pgwire.scram import parse_verifier
from tests.k8s_standin import (
    KubeStandin,
    controller_settings,
    eventually,
    kube_standin,
    play_kubelet,
    play_snapshotter,
    play_volume_binder,
    running_controller,
    stamp,
    standin_api,
)

__all__ = ["kube_standin"]  # a fixture, imported to be found

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

STATE_ID = "ab12" * 16
STATE = podspec.state_object_name(STATE_ID)


@pytest.fixture
async def api(kube_standin: KubeStandin):
    client = standin_api(kube_standin)
    yield client
    await client.close()


def instance(name: str, *, team: str = "a", renewed: datetime | None = None, **spec: Any) -> dict:
    return {
        "apiVersion": "taidon.dev/v1alpha1",
        "kind": "TaidonInstance",
        "metadata": {"name": name},
        "spec": {
            "stateId": STATE_ID,
            "alias": "orders",
            "label": "",
            "isolation": "connection",
            "team": team,
            "user": "ann",
            "leaseHolder": "gateway-0",
            "leaseRenewedAt": stamp(renewed),
            **spec,
        },
    }


async def ready_state(api: KubeApi, namespace: str) -> None:
    """A TaidonState whose snapshot the (played) snapshotter has finished."""
    await api.create(STATES, namespace, {
        "apiVersion": "taidon.dev/v1alpha1", "kind": "TaidonState",
        "metadata": {"name": STATE},
        "spec": {"stateId": STATE_ID, "snapshotName": STATE, "engine": "15", "sizeBytes": 2**31},
    })  # fmt: skip
    await eventually(lambda: api.get(VOLUME_SNAPSHOTS, namespace, STATE), "the VolumeSnapshot")
    await play_snapshotter(api, namespace, STATE)

    async def ready() -> bool:
        state = await api.get(STATES, namespace, STATE)
        return bool(state and (state.get("status") or {}).get("readyToUse"))

    await eventually(ready, "the state ready to use")


async def status_of(api: KubeApi, namespace: str, name: str) -> dict:
    obj = await api.get(INSTANCES, namespace, name)
    return (obj or {}).get("status") or {}


async def phase_is(api: KubeApi, namespace: str, name: str, phase: str) -> dict:
    async def probe() -> dict | None:
        status = await status_of(api, namespace, name)
        return status if status.get("phase") == phase else None

    return await eventually(probe, f"{name} in phase {phase}")


def condition(status: dict, kind: str) -> dict:
    (found,) = [c for c in status["conditions"] if c["type"] == kind]
    return found


async def test_state_becomes_a_volume_snapshot_of_its_builders_claim(
    kube_standin: KubeStandin, api: KubeApi
) -> None:
    async with running_controller(kube_standin, controller_settings()):
        await ready_state(api, "team-a")
    snapshot = await api.get(VOLUME_SNAPSHOTS, "team-a", STATE)
    assert snapshot is not None
    assert snapshot["spec"] == {
        "source": {"persistentVolumeClaimName": f"{STATE}-build"},
        "volumeSnapshotClassName": "csi-snap-standin",
    }
    assert snapshot["metadata"]["labels"] == podspec.labels("builder")
    state = await api.get(STATES, "team-a", STATE)
    assert condition(state["status"], "Ready")["reason"] == "SnapshotReady"


async def test_instance_gets_claim_secret_and_pod_then_runs(
    kube_standin: KubeStandin, api: KubeApi
) -> None:
    async with running_controller(kube_standin, controller_settings()):
        await ready_state(api, "team-a")
        created = await api.create(INSTANCES, "team-a", instance("orders-1"))
        pod = await eventually(lambda: api.get(PODS, "team-a", "tdi-orders-1"), "the pod")
        pvc = await api.get(PVCS, "team-a", "tdi-orders-1-data")
        secret = await api.get(SECRETS, "team-a", "tdi-orders-1-credentials")
        assert pvc is not None and secret is not None
        status = await phase_is(api, "team-a", "orders-1", "Pending")
        assert condition(status, "PodReady")["status"] == "False"
        assert status["podName"] == "tdi-orders-1" and status["pvcName"] == "tdi-orders-1-data"

        await play_volume_binder(api, "team-a", "tdi-orders-1-data")
        await play_kubelet(api, "team-a", "tdi-orders-1", ip="10.1.2.3")
        status = await phase_is(api, "team-a", "orders-1", "Running")
    assert status["endpoint"] == {"host": "10.1.2.3", "port": 5432}
    assert condition(status, "PVCBound")["status"] == "True"
    assert condition(status, "PodReady")["status"] == "True"
    assert condition(status, "QuotaExceeded")["status"] == "False"
    # The exact manifests of podspec, owned by the TaidonInstance.
    inp = podspec.InstanceInputs(
        name="orders-1", namespace="team-a", image=podspec.PodImage("taidon/postgres:15"),
        snapshot_name=STATE, storage_size="4Gi", storage_class="csi-standin", state_id=STATE_ID,
        team="a",
    )  # fmt: skip
    owner = [{
        "apiVersion": "taidon.dev/v1alpha1", "kind": "TaidonInstance", "name": "orders-1",
        "uid": created["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
    }]  # fmt: skip
    for made, expected in (
        (pod, podspec.instance_pod_manifest(inp)),
        (pvc, podspec.pvc_manifest(inp)),
    ):
        assert made["spec"] == expected["spec"]
        assert made["metadata"]["labels"] == expected["metadata"]["labels"]
        assert made["metadata"]["ownerReferences"] == owner
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) >= 24
    verifier = parse_verifier(base64.b64decode(secret["data"]["verifier"]).decode())
    assert verifier.iterations > 0


async def test_lease_and_ttl_expiry_delete_pod_claim_and_secret(
    kube_standin: KubeStandin, api: KubeApi
) -> None:
    settings = controller_settings(lease_seconds=3.0)
    async with running_controller(kube_standin, settings):
        await ready_state(api, "team-a")
        await api.create(INSTANCES, "team-a", instance("leased"))
        await api.create(INSTANCES, "team-a", instance("short", ttlSeconds=2))
        await eventually(lambda: api.get(PODS, "team-a", "tdi-leased"), "the leased pod")
        # The gateway renews one lease and then stops (it died): expiry follows.
        await api.patch(INSTANCES, "team-a", "leased", {"spec": {"leaseRenewedAt": stamp()}})
        leased = await phase_is(api, "team-a", "leased", "Expired")
        short = await phase_is(api, "team-a", "short", "Expired")
    assert condition(leased, "Expired")["reason"] == "LeaseExpired"
    assert "gateway-0" in condition(leased, "Expired")["message"]
    assert condition(short, "Expired")["reason"] == "TTLExpired"
    for name in ("leased", "short"):
        assert await api.get(PODS, "team-a", f"tdi-{name}") is None
        assert await api.get(PVCS, "team-a", f"tdi-{name}-data") is None
        assert await api.get(SECRETS, "team-a", f"tdi-{name}-credentials") is None
        assert "endpoint" not in await status_of(api, "team-a", name)


async def test_team_quota_holds_cluster_wide(kube_standin: KubeStandin, api: KubeApi) -> None:
    settings = controller_settings(team_quotas={"a": 2})
    async with running_controller(kube_standin, settings):
        for ns in ("ns-1", "ns-2"):
            await ready_state(api, ns)
        await api.create(INSTANCES, "ns-1", instance("one"))
        await api.create(INSTANCES, "ns-2", instance("two"))
        await phase_is(api, "ns-1", "one", "Pending")
        await phase_is(api, "ns-2", "two", "Pending")
        await api.create(INSTANCES, "ns-2", instance("three"))
        await api.create(INSTANCES, "ns-2", instance("other-team", team="b"))
        refused = await phase_is(api, "ns-2", "three", "Failed")
        await phase_is(api, "ns-2", "other-team", "Pending")
        # A freed place admits the next new instance.
        await api.delete(INSTANCES, "ns-1", "one")
        await eventually(
            lambda: _gone(api, "ns-1", "one"), "instance one deleted (finalizer released)"
        )
        await api.create(INSTANCES, "ns-1", instance("four"))
        await phase_is(api, "ns-1", "four", "Pending")
    quota = condition(refused, "QuotaExceeded")
    assert quota["status"] == "True"
    assert quota["message"] == "team 'a' holds 2 of 2 instances at once"
    assert await api.get(PODS, "ns-2", "tdi-three") is None
    assert await api.get(PODS, "ns-1", "tdi-one") is None  # deleted with its instance


async def _gone(api: KubeApi, namespace: str, name: str) -> bool:
    return await api.get(INSTANCES, namespace, name) is None


async def test_restarted_controller_adopts_its_objects_and_still_collects(
    kube_standin: KubeStandin, api: KubeApi
) -> None:
    async with running_controller(kube_standin, controller_settings()):
        await ready_state(api, "team-a")
        await api.create(INSTANCES, "team-a", instance("survivor"))
        first = await eventually(lambda: api.get(PODS, "team-a", "tdi-survivor"), "the pod")
        secret = await api.get(SECRETS, "team-a", "tdi-survivor-credentials")
    # While no controller runs: the kubelet reports the pod ready, and the lease goes stale.
    await play_volume_binder(api, "team-a", "tdi-survivor-data")
    await play_kubelet(api, "team-a", "tdi-survivor")
    async with running_controller(kube_standin, controller_settings()):
        status = await phase_is(api, "team-a", "survivor", "Running")
        pod = await api.get(PODS, "team-a", "tdi-survivor")
        assert pod is not None and pod["metadata"]["uid"] == first["metadata"]["uid"]
        again = await api.get(SECRETS, "team-a", "tdi-survivor-credentials")
        assert again is not None and again["data"] == secret["data"]  # same password
        stale = stamp(datetime.now(UTC) - timedelta(minutes=5))
        await api.patch(INSTANCES, "team-a", "survivor", {"spec": {"leaseRenewedAt": stale}})
        await phase_is(api, "team-a", "survivor", "Expired")
    assert condition(status, "PodReady")["status"] == "True"
    pod_creates = [r for r in kube_standin[kube_standin.resource("v1/pods")] if r.method == "POST"]
    assert len(pod_creates) == 1, "the restarted controller made a second pod"
    assert await api.get(PODS, "team-a", "tdi-survivor") is None


async def test_orphan_pods_and_claims_are_swept(kube_standin: KubeStandin, api: KubeApi) -> None:
    inp = podspec.InstanceInputs(
        name="ghost", namespace="team-a", image=podspec.PodImage("img"),
        snapshot_name="tds-00", storage_size="1Gi",
    )  # fmt: skip
    await api.create(PODS, "team-a", podspec.instance_pod_manifest(inp))
    await api.create(PVCS, "team-a", podspec.pvc_manifest(inp))
    foreign = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "labels": {"a": "b"}}}
    await api.create(PODS, "team-a", foreign)
    async with running_controller(kube_standin, controller_settings()):

        async def swept() -> bool:
            return (
                await api.get(PODS, "team-a", "tdi-ghost") is None
                and await api.get(PVCS, "team-a", "tdi-ghost-data") is None
            )

        await eventually(swept, "the orphan pod and claim deleted")
    assert await api.get(PODS, "team-a", "app") is not None  # not ours: left alone


async def test_instance_without_a_state_waits_and_says_why(
    kube_standin: KubeStandin, api: KubeApi
) -> None:
    async with running_controller(kube_standin, controller_settings()):
        await api.create(INSTANCES, "team-a", instance("early"))

        async def waiting() -> dict | None:
            status = await status_of(api, "team-a", "early")
            conds = [c for c in status.get("conditions", []) if c["type"] == "PVCBound"]
            return status if conds and conds[0]["reason"] == "StateNotReady" else None

        status = await eventually(waiting, "a StateNotReady condition")
        assert status["phase"] == "Pending"
        assert f"no TaidonState {STATE}" in condition(status, "PVCBound")["message"]
        assert await api.get(PODS, "team-a", "tdi-early") is None
        await ready_state(api, "team-a")
        await eventually(lambda: api.get(PODS, "team-a", "tdi-early"), "the pod, once ready")
