"""The kubernetes runtime (the gateway's side) with the real controller, both against the
Kubernetes API stand-in (kmock); the kubelet's and the volume binder's part is played."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taidon_proxy.k8s import podspec
from taidon_proxy.k8s.api import INSTANCES, PODS, PVCS, SECRETS, KubeApi
from taidon_proxy.runtimes import open_runtime
from taidon_proxy.runtimes.base import InstanceRuntime, RuntimeError_
from taidon_proxy.runtimes.kubernetes import KubernetesRuntime
from tests.integration.test_k8s_controller_standin import STATE_ID, api, ready_state
from tests.k8s_standin import (
    KubeStandin,
    controller_settings,
    eventually,
    kube_standin,
    play_kubelet,
    play_volume_binder,
    running_controller,
    standin_api,
)

__all__ = ["api", "kube_standin"]  # fixtures, imported to be found

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
NS = "team-a"


@contextlib.asynccontextmanager
async def kubelet_playing(api: KubeApi) -> AsyncIterator[None]:
    """Plays the kubelet and the volume binder: every instance pod becomes ready."""

    async def loop() -> None:
        done: set[str] = set()
        while True:
            for pod in await api.list(PODS, NS, {podspec.LABEL_COMPONENT: "instance"}):
                name = pod["metadata"]["name"]
                if name not in done:
                    instance = pod["metadata"]["labels"][podspec.LABEL_INSTANCE]
                    await play_volume_binder(api, NS, podspec.pvc_name(instance))
                    await play_kubelet(api, NS, name, ip=f"10.0.0.{len(done) + 2}")
                    done.add(name)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _count_is(api: KubeApi, count: int) -> bool:
    return len(await api.list(INSTANCES, NS)) == count


def runtime_for(standin: KubeStandin, **options: object) -> KubernetesRuntime:
    runtime = open_runtime(
        "kubernetes", namespace=NS, image="taidon/postgres:15", lease_holder="gw-0",
        api=standin_api(standin), **options,
    )  # fmt: skip
    assert isinstance(runtime, KubernetesRuntime) and isinstance(runtime, InstanceRuntime)
    return runtime


async def test_open_renew_release(kube_standin: KubeStandin, api: KubeApi) -> None:
    runtime = runtime_for(kube_standin, lease_seconds=2)
    try:
        async with running_controller(kube_standin, controller_settings(lease_seconds=2)):
            await ready_state(api, NS)
            async with kubelet_playing(api):
                inst = await runtime.open_instance(state_id=STATE_ID, alias="Orders_DB", team="a")
                assert inst.name.startswith("orders-db-")
                assert (inst.host, inst.port, inst.user) == ("10.0.0.2", 5432, "postgres")
                secret = await api.get(SECRETS, NS, podspec.secret_name(inst.name))
                assert base64.b64decode(secret["data"]["password"]).decode() == inst.password
                obj = await api.get(INSTANCES, NS, inst.name)
                assert obj["spec"]["leaseHolder"] == "gw-0"
                assert obj["metadata"]["labels"] == podspec.labels("gateway")
                # Three lease lengths later the renewed instance still runs.
                await asyncio.sleep(5)
                obj = await api.get(INSTANCES, NS, inst.name)
                assert obj["status"]["phase"] == "Running", obj["status"]
                await runtime.release(inst.name)

                async def cleaned() -> bool:
                    return (
                        await api.get(INSTANCES, NS, inst.name) is None
                        and await api.get(PODS, NS, podspec.pod_name(inst.name)) is None
                        and await api.get(PVCS, NS, podspec.pvc_name(inst.name)) is None
                    )

                await eventually(cleaned, "the instance, its pod and claim deleted")
    finally:
        await runtime.close()


async def test_quota_refusal_is_a_capacity_error(kube_standin: KubeStandin, api: KubeApi) -> None:
    runtime = runtime_for(kube_standin)
    try:
        async with running_controller(kube_standin, controller_settings(team_quotas={"a": 1})):
            await ready_state(api, NS)
            async with kubelet_playing(api):
                await runtime.open_instance(state_id=STATE_ID, alias="orders", team="a")
                with pytest.raises(RuntimeError_) as refused:
                    await runtime.open_instance(state_id=STATE_ID, alias="orders", team="a")
                assert refused.value.sqlstate == "53300"
                assert refused.value.message == "team 'a' holds 1 of 1 instances at once"
                # The refused TaidonInstance is deleted (once the controller's finalizer
                # is released); the held one is left.
                await eventually(lambda: _count_is(api, 1), "the refused instance deleted")
            await runtime.close()  # releases what it holds
            await eventually(lambda: _count_is(api, 0), "the held instance deleted")
    finally:
        await runtime.close()


async def test_not_running_in_time_names_the_conditions(
    kube_standin: KubeStandin, api: KubeApi
) -> None:
    runtime = runtime_for(kube_standin, start_timeout=2)
    try:
        async with running_controller(kube_standin, controller_settings()):
            with pytest.raises(RuntimeError_, match="did not run within 2 s") as late:
                await runtime.open_instance(state_id=STATE_ID, alias="orders")
            assert "StateNotReady" in late.value.message
            await eventually(lambda: _count_is(api, 0), "the late instance deleted")
        with pytest.raises(RuntimeError_, match="invalid state id"):
            await runtime.open_instance(state_id="not-hex", alias="orders")
        with pytest.raises(RuntimeError_, match="data directory"):
            await runtime.start("x", Path("/nonexistent"))
    finally:
        await runtime.close()
