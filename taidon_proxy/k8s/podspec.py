"""The exact Kubernetes manifests of an instance and a build: pure functions of typed inputs."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from taidon_proxy.pgwire.scram import make_verifier
from taidon_proxy.runtimes.base import RuntimeError_
from taidon_proxy.runtimes.settings import server_settings

GROUP = "taidon.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
SNAPSHOT_API_VERSION = f"{SNAPSHOT_GROUP}/v1"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "taidon.dev/instance"
LABEL_STATE = "taidon.dev/state"
LABEL_TEAM = "taidon.dev/team"

PORT = 5432
SUPERUSER = "postgres"
DATA_MOUNT = "/var/lib/postgresql/data"
# A volume's root holds lost+found on most filesystems: Postgres wants an empty directory.
PGDATA = f"{DATA_MOUNT}/pgdata"
SOCKET_DIR = "/var/run/postgresql"
CREDENTIALS_MOUNT = "/etc/taidon"
HBA_FILE = f"{CREDENTIALS_MOUNT}/pg_hba.conf"
# Every connection authenticates, the pod's own socket included: nothing is trusted.
PG_HBA = (
    "# written by taidon: every connection proves the per-instance password\n"
    "local all all scram-sha-256\n"
    "host all all 0.0.0.0/0 scram-sha-256\n"
    "host all all ::/0 scram-sha-256\n"
)
SECRET_PASSWORD = "password"  # what the gateway reads to connect
SECRET_VERIFIER = "verifier"  # what the pod's init container stores as the role's password
SECRET_HBA = "pg_hba.conf"
ENV_VERIFIER = "TAIDON_SUPERUSER_VERIFIER"
# Sets the per-instance password from the Secret before the server listens. The verifier
# is Postgres's own SCRAM format (no quote can occur in it); the postmaster.pid that a
# clone of a live server carries is stale in the new pod.
SET_PASSWORD_SCRIPT = (
    'rm -f "$PGDATA/postmaster.pid" && '
    "echo \"ALTER ROLE postgres PASSWORD '$" + ENV_VERIFIER + "'\" "
    '| postgres --single -D "$PGDATA" postgres >/dev/null'
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = 40  # leaves room for the prefixes and suffixes below within 63 characters


def check_name(name: str, what: str = "instance name") -> str:
    """`name` if it is a DNS-1123 label short enough for every derived name; else an error."""
    if len(name) > MAX_NAME or not _DNS_LABEL.fullmatch(name):
        raise RuntimeError_(
            f"invalid {what} {name!r}: lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {MAX_NAME} characters"
        )
    return name


def pod_name(instance: str) -> str:
    return f"tdi-{instance}"


def pvc_name(instance: str) -> str:
    return f"tdi-{instance}-data"


def secret_name(instance: str) -> str:
    return f"tdi-{instance}-credentials"


def state_object_name(state_id: str) -> str:
    """The TaidonState (and default VolumeSnapshot) name of a state id."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", state_id):
        raise RuntimeError_(f"invalid state id {state_id!r}: expected hex digits")
    return f"tds-{state_id[:32]}"


def builder_pod_name(state_object: str) -> str:
    return f"{state_object}-builder"


def builder_pvc_name(state_object: str) -> str:
    return f"{state_object}-build"


def labels(component: str, *, instance: str | None = None) -> dict[str, str]:
    """The labels every object we create carries (the shared contract)."""
    out = {LABEL_NAME: "taidon", LABEL_COMPONENT: component}
    if instance is not None:
        out[LABEL_INSTANCE] = instance
    return out


@dataclass(frozen=True)
class Resources:
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str | None = "1"
    memory_limit: str | None = "512Mi"

    def manifest(self) -> dict[str, dict[str, str]]:
        limits = {"cpu": self.cpu_limit, "memory": self.memory_limit}
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {k: v for k, v in limits.items() if v is not None},
        }


@dataclass(frozen=True)
class PodImage:
    """The Postgres image a pod runs and the uid/gid of its postgres user."""

    image: str
    uid: int = 100  # the postgres user of the project's local image (scripts/docker-image)
    gid: int = 102
    pull_policy: str = "IfNotPresent"


@dataclass(frozen=True)
class InstanceInputs:
    """What an instance pod is made from: one TaidonInstance, resolved."""

    name: str
    namespace: str
    image: PodImage
    snapshot_name: str  # the state's VolumeSnapshot
    storage_size: str  # at least the snapshot's restore size
    storage_class: str | None = None
    state_id: str = ""
    team: str = ""
    settings: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class Credentials:
    """A per-instance password for the superuser, and the verifier the server stores."""

    password: str
    verifier: str

    @classmethod
    def make(cls, password: str, salt: bytes) -> Credentials:
        return cls(password=password, verifier=make_verifier(password, salt=salt))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _meta(name: str, namespace: str, lbls: Mapping[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(lbls)}


def postgres_args(settings: Mapping[str, str]) -> list[str]:
    """postgres's argv after the program: listen on the pod network, password auth only."""
    args = ["-D", PGDATA, "-c", "listen_addresses=*", "-c", f"port={PORT}"]
    args += ["-c", f"unix_socket_directories={SOCKET_DIR}", "-c", f"hba_file={HBA_FILE}"]
    args += ["-c", "password_encryption=scram-sha-256"]
    for key, value in server_settings(settings).items():
        args += ["-c", f"{key}={value}"]
    return args


def readiness_command() -> list[str]:
    """pg_isready needs no password: a server that answers at all accepts connections."""
    return ["pg_isready", "-q", "-h", SOCKET_DIR, "-p", str(PORT), "-U", SUPERUSER]


def secret_manifest(inp: InstanceInputs, creds: Credentials) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(
            secret_name(inp.name), inp.namespace, labels("instance", instance=inp.name)
        ),
        "type": "Opaque",
        "data": {
            SECRET_PASSWORD: _b64(creds.password),
            SECRET_VERIFIER: _b64(creds.verifier),
            SECRET_HBA: _b64(PG_HBA),
        },
    }


def pvc_manifest(inp: InstanceInputs) -> dict[str, Any]:
    """A claim cloned from the state's VolumeSnapshot (CSI dataSource)."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": inp.storage_size}},
        "dataSource": {
            "apiGroup": SNAPSHOT_GROUP,
            "kind": "VolumeSnapshot",
            "name": inp.snapshot_name,
        },
    }
    if inp.storage_class is not None:
        spec["storageClassName"] = inp.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(pvc_name(inp.name), inp.namespace, labels("instance", instance=inp.name)),
        "spec": spec,
    }


def _security(image: PodImage) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {
        "runAsNonRoot": True,
        "runAsUser": image.uid,
        "runAsGroup": image.gid,
        "fsGroup": image.gid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return pod, container


def _scratch_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    mounts = [{"name": "run", "mountPath": SOCKET_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    return volumes, mounts


def instance_pod_manifest(inp: InstanceInputs) -> dict[str, Any]:
    """The instance pod: an init container sets the password, then postgres on the clone."""
    pod_security, container_security = _security(inp.image)
    scratch, scratch_mounts = _scratch_volumes()
    data_mount = {"name": "data", "mountPath": DATA_MOUNT}
    creds_mount = {"name": "credentials", "mountPath": CREDENTIALS_MOUNT, "readOnly": True}
    env = [{"name": "PGDATA", "value": PGDATA}]
    verifier_env = {
        "name": ENV_VERIFIER,
        "valueFrom": {"secretKeyRef": {"name": secret_name(inp.name), "key": SECRET_VERIFIER}},
    }
    common = {
        "image": inp.image.image,
        "imagePullPolicy": inp.image.pull_policy,
        "securityContext": container_security,
        "resources": inp.resources.manifest(),
    }
    init = {
        "name": "set-password",
        **common,
        "command": ["sh", "-c", SET_PASSWORD_SCRIPT],
        "env": [*env, verifier_env],
        "volumeMounts": [data_mount, *scratch_mounts],
    }
    main = {
        "name": "postgres",
        **common,
        "command": ["postgres"],
        "args": postgres_args(inp.settings),
        "env": env,
        "ports": [{"name": "postgres", "containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "exec": {"command": readiness_command()},
            "periodSeconds": 2,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "volumeMounts": [data_mount, creds_mount, *scratch_mounts],
    }
    lbls = labels("instance", instance=inp.name)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(pod_name(inp.name), inp.namespace, lbls),
        "spec": {
            "restartPolicy": "Never",  # a crashed instance is replaced, not restarted in place
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_security,
            "terminationGracePeriodSeconds": 30,
            "initContainers": [init],
            "containers": [main],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": pvc_name(inp.name)}},
                {
                    "name": "credentials",
                    "secret": {"secretName": secret_name(inp.name), "defaultMode": 0o440},
                },
                *scratch,
            ],
        },
    }


@dataclass(frozen=True)
class BuilderInputs:
    """A build server: postgres on a fresh claim (or one cloned from a parent state)."""

    state_object: str  # TaidonState name
    namespace: str
    image: PodImage
    storage_size: str
    storage_class: str | None = None
    parent_snapshot: str | None = None
    resources: Resources = field(default_factory=Resources)


def builder_pvc_manifest(inp: BuilderInputs) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": inp.storage_size}},
    }
    if inp.parent_snapshot is not None:
        spec["dataSource"] = {
            "apiGroup": SNAPSHOT_GROUP,
            "kind": "VolumeSnapshot",
            "name": inp.parent_snapshot,
        }
    if inp.storage_class is not None:
        spec["storageClassName"] = inp.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(builder_pvc_name(inp.state_object), inp.namespace, labels("builder")),
        "spec": spec,
    }


def builder_pod_manifest(inp: BuilderInputs, *, command: list[str]) -> dict[str, Any]:
    """A builder pod running `command` (its migration tool) with the build claim mounted."""
    pod_security, container_security = _security(inp.image)
    scratch, scratch_mounts = _scratch_volumes()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(builder_pod_name(inp.state_object), inp.namespace, labels("builder")),
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_security,
            "containers": [
                {
                    "name": "build",
                    "image": inp.image.image,
                    "imagePullPolicy": inp.image.pull_policy,
                    "command": command,
                    "env": [{"name": "PGDATA", "value": PGDATA}],
                    "securityContext": container_security,
                    "resources": inp.resources.manifest(),
                    "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}, *scratch_mounts],
                }
            ],
            "volumes": [
                {
                    "name": "data",
                    "persistentVolumeClaim": {"claimName": builder_pvc_name(inp.state_object)},
                },
                *scratch,
            ],
        },
    }


def volume_snapshot_manifest(
    *, name: str, namespace: str, source_pvc: str, snapshot_class: str | None
) -> dict[str, Any]:
    """A VolumeSnapshot of a claim (a builder's, once its build server stopped)."""
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": source_pvc}}
    if snapshot_class is not None:
        spec["volumeSnapshotClassName"] = snapshot_class
    return {
        "apiVersion": SNAPSHOT_API_VERSION,
        "kind": "VolumeSnapshot",
        "metadata": _meta(name, namespace, labels("builder")),
        "spec": spec,
    }
