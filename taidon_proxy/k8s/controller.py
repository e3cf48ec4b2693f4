"""The Kubernetes controller: kopf handlers over TaidonInstance and TaidonState, an orphan sweep.

Every handler calls one idempotent step of `reconcile.Reconciler`, so a restarted controller
picks up where the last one stopped: objects it made are found by name and adopted by their
labels, and timers look at every object again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import kopf
import structlog

from taidon_proxy.k8s import podspec
from taidon_proxy.k8s.api import INSTANCES, PODS, PVCS, STATES, KubeApi, KubeError
from taidon_proxy.k8s.reconcile import ControllerSettings, Reconciler

log = structlog.get_logger(__name__)

INSTANCE_LABELS = {podspec.LABEL_NAME: "taidon", podspec.LABEL_COMPONENT: "instance"}


def make_registry(
    settings: ControllerSettings,
    api_factory: Callable[[], KubeApi],
    *,
    login: Callable[..., Any] | None = None,
) -> kopf.OperatorRegistry:
    """A registry with the controller's handlers (nothing is registered at import time).

    `login` replaces kopf's own credential discovery (a test's API stand-in URL, for one).
    """
    registry = kopf.OperatorRegistry()
    holder: dict[str, Reconciler] = {}

    def reconciler() -> Reconciler:
        if "r" not in holder:
            holder["r"] = Reconciler(api_factory(), settings)
        return holder["r"]

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Objects of ours carry their own finalizer name; progress lives in annotations.
        settings.persistence.finalizer = f"{podspec.GROUP}/controller"
        settings.posting.level = 30  # warnings and errors become Events
        settings.watching.server_timeout = 60

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        if "r" in holder:
            await holder.pop("r").api.close()

    if login is not None:
        kopf.on.login(registry=registry)(login)

    group, version = podspec.GROUP, podspec.VERSION
    interval = settings.interval

    @kopf.on.create(group, version, INSTANCES.plural, registry=registry)
    @kopf.on.resume(group, version, INSTANCES.plural, registry=registry)
    async def instance_created(body: kopf.Body, **_: Any) -> None:
        await reconciler().reconcile_instance(body)

    @kopf.timer(group, version, INSTANCES.plural, interval=interval, registry=registry)
    async def instance_timer(body: kopf.Body, **_: Any) -> None:
        await reconciler().reconcile_instance(body)

    @kopf.on.delete(group, version, INSTANCES.plural, registry=registry)
    async def instance_deleted(body: kopf.Body, **_: Any) -> None:
        await reconciler().delete_instance(body)

    @kopf.on.create(group, version, STATES.plural, registry=registry)
    @kopf.on.resume(group, version, STATES.plural, registry=registry)
    @kopf.timer(group, version, STATES.plural, interval=interval, registry=registry)
    async def state_seen(body: kopf.Body, **_: Any) -> None:
        await reconciler().reconcile_state(body)

    return registry


async def run(
    settings: ControllerSettings,
    *,
    api_factory: Callable[[], KubeApi] = KubeApi.in_cluster,
    login: Callable[..., Any] | None = None,
    stop: asyncio.Event | None = None,
    namespaces: list[str] | None = None,
    liveness: str | None = None,
) -> None:
    """Run the controller until `stop` is set (cluster-wide unless namespaces are named);
    `liveness` is kopf's health endpoint (http://0.0.0.0:8081/healthz) for the pod's probes."""
    registry = make_registry(settings, api_factory, login=login)
    stop = stop or asyncio.Event()
    sweeper = asyncio.create_task(sweep_orphans(settings, api_factory, stop, namespaces))
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces or [],
            stop_flag=stop,
            standalone=True,
            liveness_endpoint=liveness,
        )
    finally:
        stop.set()
        await sweeper


async def sweep_orphans(
    settings: ControllerSettings,
    api_factory: Callable[[], KubeApi],
    stop: asyncio.Event,
    namespaces: list[str] | None = None,
) -> None:
    """Every interval: delete instance pods and claims whose TaidonInstance is gone.

    A loop of its own rather than kopf timers on pods: those would put a finalizer on every
    instance pod, and a stopped controller would then hold up every pod's deletion.
    """
    api = api_factory()
    reconciler = Reconciler(api, settings)
    try:
        while not stop.is_set():
            # Only the namespaces it watches: a namespaced Role (the chart's) allows no more.
            where: list[str | None] = list(namespaces) if namespaces else [None]
            for kind, ns in [(k, n) for k in (PODS, PVCS) for n in where]:
                try:
                    for obj in await api.list(kind, ns, INSTANCE_LABELS):
                        await reconciler.sweep_orphan(kind, obj)
                except KubeError as exc:
                    log.warning("k8s.sweep.failed", kind=kind.kind, error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.interval):
                    await stop.wait()
    finally:
        await api.close()


def settings_from_env(env: Mapping[str, str]) -> ControllerSettings:
    """The controller's settings from its pod's environment (TAIDON_*); errors name the key."""

    def number(key: str, default: float) -> float:
        try:
            value = float(env.get(key, default))
        except ValueError:
            raise KubeError(f"{key} must be a number of seconds, not {env[key]!r}") from None
        if value <= 0:
            raise KubeError(f"{key} must be positive, not {value}")
        return value

    image = env.get("TAIDON_IMAGE")
    if not image:
        raise KubeError("TAIDON_IMAGE (the instance pods' Postgres image) is required")
    quotas: dict[str, int] = {}
    for item in filter(None, env.get("TAIDON_TEAM_QUOTAS", "").split(",")):
        team, _, limit = item.partition("=")
        if not team.strip() or not limit.strip().isdigit():
            raise KubeError(f"TAIDON_TEAM_QUOTAS: expected team=N[,team=N], not {item!r}")
        quotas[team.strip()] = int(limit)
    default = env.get("TAIDON_DEFAULT_TEAM_QUOTA")
    if default is not None and not default.isdigit():
        raise KubeError(f"TAIDON_DEFAULT_TEAM_QUOTA must be a whole number, not {default!r}")
    try:
        uid, gid = int(env.get("TAIDON_IMAGE_UID", "100")), int(env.get("TAIDON_IMAGE_GID", "102"))
    except ValueError:
        raise KubeError("TAIDON_IMAGE_UID and TAIDON_IMAGE_GID must be numbers") from None
    return ControllerSettings(
        image=podspec.PodImage(image, uid=uid, gid=gid),
        storage_class=env.get("TAIDON_STORAGE_CLASS") or None,
        snapshot_class=env.get("TAIDON_SNAPSHOT_CLASS") or None,
        lease_seconds=number("TAIDON_LEASE_SECONDS", 60.0),
        interval=number("TAIDON_RECONCILE_SECONDS", 10.0),
        team_quotas=quotas,
        default_team_quota=int(default) if default is not None else None,
    )
