"""The CRDs in deploy/crds hold the shared contract's fields, names and subresources."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from taidon_proxy.k8s import podspec
from taidon_proxy.k8s.api import INSTANCES, STATES

pytestmark = pytest.mark.unit

CRDS = Path(__file__).resolve().parents[2] / "deploy" / "crds"
CONDITION = {"type", "status", "reason", "message", "lastTransitionTime"}


def load(name: str) -> tuple[dict, dict]:
    crd = yaml.safe_load((CRDS / name).read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["labels"] == podspec.labels("controller")
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    return crd, version["schema"]["openAPIV3Schema"]["properties"]


def test_taidoninstance_crd() -> None:
    crd, schema = load("taidoninstances.yaml")
    spec = crd["spec"]
    assert spec["group"] == podspec.GROUP == INSTANCES.group
    assert crd["metadata"]["name"] == f"{INSTANCES.plural}.{INSTANCES.group}"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == INSTANCES.kind
    assert spec["names"]["plural"] == INSTANCES.plural
    assert spec["names"]["shortNames"] == ["tdi"]
    assert set(schema["spec"]["properties"]) == {
        "stateId", "alias", "label", "isolation", "ttlSeconds", "idleTtlSeconds", "team",
        "user", "leaseHolder", "leaseRenewedAt",
    }  # fmt: skip
    status = schema["status"]["properties"]
    assert set(status) == {"phase", "podName", "pvcName", "endpoint", "conditions"}
    assert status["phase"]["enum"] == ["Pending", "Running", "Failed", "Expired"]
    assert set(status["endpoint"]["properties"]) == {"host", "port"}
    assert set(status["conditions"]["items"]["properties"]) == CONDITION
    # The state id pattern accepts what the runtime sends and refuses what it refuses.
    pattern = schema["spec"]["properties"]["stateId"]["pattern"]
    assert pattern == "^[0-9a-f]{8,64}$"


def test_taidonstate_crd() -> None:
    crd, schema = load("taidonstates.yaml")
    spec = crd["spec"]
    assert spec["group"] == STATES.group
    assert crd["metadata"]["name"] == f"{STATES.plural}.{STATES.group}"
    assert spec["names"]["kind"] == STATES.kind
    assert spec["names"]["plural"] == STATES.plural
    assert spec["names"]["shortNames"] == ["tds"]
    assert spec["scope"] == "Namespaced"
    assert set(schema["spec"]["properties"]) == {
        "stateId", "parentId", "snapshotName", "engine", "sizeBytes",
    }  # fmt: skip
    status = schema["status"]["properties"]
    assert set(status) == {"readyToUse", "conditions"}
    assert set(status["conditions"]["items"]["properties"]) == CONDITION


def test_printer_columns_point_at_schema_fields() -> None:
    for name in ("taidoninstances.yaml", "taidonstates.yaml"):
        crd, schema = load(name)
        (version,) = crd["spec"]["versions"]
        for column in version["additionalPrinterColumns"]:
            path = column["jsonPath"].lstrip(".").split(".")
            if path[0] == "metadata":
                continue
            node = schema
            for part in path[:-1]:
                node = node[part]["properties"]
            assert path[-1] in node, f"{name}: column {column['name']} -> {column['jsonPath']}"
