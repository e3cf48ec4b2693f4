"""The Kubernetes manifests of an instance and a build, checked field by field."""

from __future__ import annotations

import base64

import pytest

from taidon_proxy.k8s import podspec
from taidon_proxy.pgwire.scram import parse_verifier
from taidon_proxy.runtimes.base import RuntimeError_

pytestmark = pytest.mark.unit

LABELS = {
    "app.kubernetes.io/name": "taidon",
    "app.kubernetes.io/component": "instance",
    "taidon.dev/instance": "orders-1",
}


def inputs(**overrides: object) -> podspec.InstanceInputs:
    values: dict[str, object] = {
        "name": "orders-1",
        "namespace": "team-a",
        "image": podspec.PodImage("registry.example/taidon/postgres:15"),
        "snapshot_name": "tds-0123abcd",
        "storage_size": "2Gi",
        "storage_class": "csi-rbd",
        "settings": {"work_mem": "8MB"},
    }
    values.update(overrides)
    return podspec.InstanceInputs(**values)  # type: ignore[arg-type]


def test_pvc_is_cloned_from_the_states_volume_snapshot() -> None:
    assert podspec.pvc_manifest(inputs()) == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "tdi-orders-1-data", "namespace": "team-a", "labels": LABELS},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "2Gi"}},
            "dataSource": {
                "apiGroup": "snapshot.storage.k8s.io",
                "kind": "VolumeSnapshot",
                "name": "tds-0123abcd",
            },
            "storageClassName": "csi-rbd",
        },
    }
    assert "storageClassName" not in podspec.pvc_manifest(inputs(storage_class=None))["spec"]


def test_secret_holds_password_verifier_and_hba() -> None:
    creds = podspec.Credentials.make("s3cret-pass", salt=b"0123456789abcdef")
    secret = podspec.secret_manifest(inputs(), creds)
    assert secret["metadata"] == {
        "name": "tdi-orders-1-credentials",
        "namespace": "team-a",
        "labels": LABELS,
    }
    assert secret["type"] == "Opaque"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["password"] == "s3cret-pass"
    assert parse_verifier(data["verifier"]).iterations > 0
    assert "s3cret-pass" not in data["verifier"]
    assert data["pg_hba.conf"].splitlines()[1:] == [
        "local all all scram-sha-256",
        "host all all 0.0.0.0/0 scram-sha-256",
        "host all all ::/0 scram-sha-256",
    ]
    assert "trust" not in data["pg_hba.conf"].split("\n", 1)[1]


def test_instance_pod_runs_postgres_non_root_read_only_and_private() -> None:
    pod = podspec.instance_pod_manifest(inputs())
    assert pod["metadata"] == {"name": "tdi-orders-1", "namespace": "team-a", "labels": LABELS}
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 100,
        "runAsGroup": 102,
        "fsGroup": 102,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (init,) = spec["initContainers"]
    (main,) = spec["containers"]
    for container in (init, main):
        assert container["image"] == "registry.example/taidon/postgres:15"
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert container["resources"] == {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        }
    assert init["command"] == ["sh", "-c", podspec.SET_PASSWORD_SCRIPT]
    assert {"name": "TAIDON_SUPERUSER_VERIFIER", "valueFrom": {"secretKeyRef": {
        "name": "tdi-orders-1-credentials", "key": "verifier"}}} in init["env"]  # fmt: skip
    assert main["command"] == ["postgres"]
    args = main["args"]
    pairs = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "-c")
    assert args[:2] == ["-D", "/var/lib/postgresql/data/pgdata"]
    assert pairs["listen_addresses"] == "*"
    assert pairs["port"] == "5432"
    assert pairs["hba_file"] == "/etc/taidon/pg_hba.conf"
    assert pairs["unix_socket_directories"] == "/var/run/postgresql"
    assert pairs["work_mem"] == "8MB"
    assert pairs["fsync"] == "off"  # the runtimes' throwaway defaults
    assert main["ports"] == [{"name": "postgres", "containerPort": 5432, "protocol": "TCP"}]
    assert main["readinessProbe"]["exec"]["command"] == [
        "pg_isready", "-q", "-h", "/var/run/postgresql", "-p", "5432", "-U", "postgres",
    ]  # fmt: skip
    assert main["env"] == [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}]
    assert "valueFrom" not in str(main["env"])  # the server never sees the verifier's env
    assert main["volumeMounts"] == [
        {"name": "data", "mountPath": "/var/lib/postgresql/data"},
        {"name": "credentials", "mountPath": "/etc/taidon", "readOnly": True},
        {"name": "run", "mountPath": "/var/run/postgresql"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    assert spec["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "tdi-orders-1-data"}},
        {"name": "credentials", "secret": {
            "secretName": "tdi-orders-1-credentials", "defaultMode": 0o440}},
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]  # fmt: skip


def test_reserved_and_malformed_settings_are_refused() -> None:
    with pytest.raises(RuntimeError_, match="managed by the runtime"):
        podspec.instance_pod_manifest(inputs(settings={"listen_addresses": "*"}))
    with pytest.raises(RuntimeError_, match="invalid setting name"):
        podspec.instance_pod_manifest(inputs(settings={"a b": "1"}))


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "trail-", "a_b", "x" * 41])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(RuntimeError_, match="invalid instance name"):
        podspec.check_name(name)


def test_state_object_name() -> None:
    assert podspec.state_object_name("ab" * 32) == "tds-" + "ab" * 16
    with pytest.raises(RuntimeError_, match="invalid state id"):
        podspec.state_object_name("../x")


def test_builder_claim_pod_and_snapshot() -> None:
    inp = podspec.BuilderInputs(
        state_object="tds-feed",
        namespace="team-a",
        image=podspec.PodImage("img:15"),
        storage_size="1Gi",
        parent_snapshot="tds-beef",
    )
    builder_labels = {"app.kubernetes.io/name": "taidon", "app.kubernetes.io/component": "builder"}
    pvc = podspec.builder_pvc_manifest(inp)
    assert pvc["metadata"]["name"] == "tds-feed-build"
    assert pvc["spec"]["dataSource"]["name"] == "tds-beef"
    pod = podspec.builder_pod_manifest(inp, command=["sqlrs", "build"])
    assert pod["metadata"]["labels"] == builder_labels
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["sqlrs", "build"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "tds-feed-build"
    assert podspec.volume_snapshot_manifest(
        name="tds-feed", namespace="team-a", source_pvc="tds-feed-build", snapshot_class="csi-snap"
    ) == {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": "tds-feed", "namespace": "team-a", "labels": builder_labels},
        "spec": {
            "source": {"persistentVolumeClaimName": "tds-feed-build"},
            "volumeSnapshotClassName": "csi-snap",
        },
    }
