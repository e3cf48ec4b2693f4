"""The Helm chart (deploy/helm/taidon), rendered by a real helm and checked object by object:
every object valid against the Kubernetes schemas (kubernetes-validate, strict), the shared
labels, probes, resources, security contexts, NetworkPolicies and least RBAC; bad values fail
the render with a message naming the value. No cluster: nothing here is applied."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from taidon_proxy.config_load import parse_config
from tests.conftest import REPO

pytestmark = pytest.mark.integration

HELM = REPO / ".tools" / "helm" / "helm"
CHART = REPO / "deploy" / "helm" / "taidon"
CRDS = REPO / "deploy" / "crds"
KUBE_VERSION = "1.30.0"  # the oldest release the validator and kind's current images share
COMPONENTS = {"gateway", "controller", "instance", "builder"}
NAMESPACE = "dbs"

REQUIRED = {
    "runtime": {"storageClass": "csi-hostpath-sc", "snapshotClass": "csi-hostpath-snapclass"},
    "metadata": {"dsn": "postgresql://taidon:pw@metadata:5432/taidon"},
    "auth": {"existingSecret": "taidon-users", "users": {"app": "app", "ci": "ci"}},
}
FULL = {
    **REQUIRED,
    "metadata": {"existingSecret": "taidon-metadata", "key": "url"},
    "admin": {"port": 9090, "tokenSecret": "taidon-admin"},
    "tls": {"existingSecret": "taidon-tls"},
    "recipeFiles": {"schema.sql": "create table t (x int);\n"},
    "config": {
        "databases": {
            "app": {"prepare": {"kind": "psql", "files": ["/etc/taidon/recipes/schema.sql"]}}
        },
        "instances": {"max": 40},
        # The chart's keys win over these.
        "listen": "127.0.0.1:1",
        "shutdown_grace": "1s",
    },
    "gateway": {"drainGraceSeconds": 120, "stopMarginSeconds": 20, "preStopSeconds": 0},
    "autoscaling": {"metric": "cpu", "cpuUtilization": 60},
    "networkPolicy": {
        "clientsFrom": [{"namespaceSelector": {"matchLabels": {"team": "ci"}}}],
        "adminFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}],
    },
}
FIXED = {**REQUIRED, "autoscaling": {"enabled": False}, "gateway": {"replicas": 3}}
VALUE_SETS = {"required": REQUIRED, "full": FULL, "fixed-replicas": FIXED}


def helm(*args: str, values: dict[str, Any] | None, tmp: Path) -> subprocess.CompletedProcess[str]:
    assert HELM.exists(), f"{HELM} missing: run scripts/setup --full (it installs Helm there)"
    extra: list[str] = []
    if values is not None:
        f = tmp / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        extra = ["-f", str(f)]
    return subprocess.run(  # noqa: PLW1510 - callers read returncode
        [str(HELM), *args, *extra], capture_output=True, text=True, timeout=60
    )


def render(values: dict[str, Any], tmp: Path, *flags: str) -> list[dict[str, Any]]:
    r = helm("template", "t", str(CHART), "--namespace", NAMESPACE, *flags, values=values, tmp=tmp)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, list[Any]]]:
    name: str = request.param
    yield name, render(VALUE_SETS[name], tmp_path)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in docs:
        if d["kind"] == "Deployment":
            yield d, d["spec"]["template"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses only matchLabels
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_helm_lint_passes_strict(tmp_path: Path) -> None:
    r = helm("lint", "--strict", str(CHART), values=REQUIRED, tmp=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


def test_every_object_is_valid_and_labelled(rendered: tuple[str, list[Any]]) -> None:
    _, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("ConfigMap", "Deployment", "NetworkPolicy", "Role", "RoleBinding", "Service"):
        assert kind in kinds
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)  # raises on any problem
        labels = d["metadata"]["labels"]
        what = f"{d['kind']}/{d['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "taidon", what
        assert labels["app.kubernetes.io/component"] in COMPONENTS, what
        assert labels["app.kubernetes.io/instance"] == "t", what
        assert "namespace" not in d["metadata"], what  # installed where the release is
    for _, tpl in pods(docs):
        assert tpl["metadata"]["labels"]["app.kubernetes.io/name"] == "taidon"


def test_pods_are_non_root_read_only_with_probes_and_resources(
    rendered: tuple[str, list[Any]],
) -> None:
    _, docs = rendered
    assert {d["metadata"]["name"] for d, _ in pods(docs)} == {
        "t-taidon-gateway",
        "t-taidon-controller",
    }
    for d, tpl in pods(docs):
        spec = tpl["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["serviceAccountName"] != "default"
        for c in spec.get("initContainers", []) + spec["containers"]:
            what = f"{d['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, what
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["capabilities"] == {"drop": ["ALL"]}, what
            for k in ("cpu", "memory"):
                assert c["resources"]["requests"][k] and c["resources"]["limits"][k], what
        for c in spec["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
            ports = {p["name"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["port"] in ports


def test_gateway_probes_the_admin_api_and_waits_out_the_drain(
    rendered: tuple[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, docs = rendered
    values = VALUE_SETS[name]
    gw = one(docs, "Deployment", "t-taidon-gateway")
    spec = gw["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    admin_port = values.get("admin", {}).get("port", 8080)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "postgres": 5432,
        "admin": admin_port,
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/v1/ready", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v1/health", "port": "admin"}
    # The config the gateway runs, read by the proxy's own loader.
    cm = one(docs, "ConfigMap", "t-taidon-config")
    data = yaml.safe_load(cm["data"]["taidon.yaml"])
    assert data["runtime"] == {
        "kind": "kubernetes",
        "namespace": NAMESPACE,
        "image": "postgres:15",
        "storage_class": "csi-hostpath-sc",
        "snapshot_class": "csi-hostpath-snapclass",
    }
    assert data["metadata"] == {"kind": "postgres", "dsn": "${TAIDON_METADATA_DSN}"}
    # Those two sections are read by the other Kubernetes modules' config (docs/kubernetes.md);
    # the rest must load as it is, every ${NAME} from the container's env.
    env = {e["name"]: e for e in c["env"]}
    for var in re.findall(r"\$\{(\w+)\}", cm["data"]["taidon.yaml"]):
        assert var in env, var
        monkeypatch.setenv(var, f"value-of-{var}")
    rest = {k: v for k, v in data.items() if k not in ("runtime", "metadata")}
    # (Files are checked against the mounts below: the loader would look on this machine.)
    cfg = parse_config(yaml.safe_dump(rest), source=Path("/etc/taidon/taidon.yaml"), check=False)
    assert cfg.listen == "0.0.0.0:5432" and cfg.admin.listen == f"0.0.0.0:{admin_port}"
    assert cfg.auth.method == "scram-sha-256"
    assert sorted(cfg.auth.users) == sorted(values["auth"]["users"])
    secret_of = {
        e["valueFrom"]["secretKeyRef"]["key"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in env.values()
    }
    for key in values["auth"]["users"].values():
        assert secret_of[key] == "taidon-users"
    gateway = values.get("gateway", {})
    grace = gateway.get("drainGraceSeconds", 30)
    assert cfg.shutdown_grace == grace
    # The kubelet waits for the preStop sleep, the drain and the 57P01 round, then some.
    pre_stop = gateway.get("preStopSeconds", 3)
    margin = gateway.get("stopMarginSeconds", 15)
    assert spec["terminationGracePeriodSeconds"] == pre_stop + grace + margin
    assert spec["terminationGracePeriodSeconds"] > pre_stop + cfg.shutdown_grace
    if pre_stop:
        assert c["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(pre_stop)]}}
    else:
        assert "lifecycle" not in c
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert {"/var/lib/taidon", "/tmp", "/etc/taidon/taidon.yaml"} <= set(mounts)
    volumes = {v["name"]: v for v in spec["volumes"]}
    if "tls" in values:
        assert (cfg.tls.cert, cfg.tls.key) == (
            Path("/etc/taidon/tls/tls.crt"),
            Path("/etc/taidon/tls/tls.key"),
        )
        assert volumes[mounts["/etc/taidon/tls"]]["secret"]["secretName"] == "taidon-tls"
    for recipe in cfg.databases.values():  # every file a recipe names is in the mounted map
        for f in getattr(recipe.prepare, "files", []):
            assert f.parent == Path("/etc/taidon/recipes")
            recipes_map = volumes[mounts["/etc/taidon/recipes"]]["configMap"]["name"]
            assert f.name in one(docs, "ConfigMap", recipes_map)["data"]
    # The replica count: fixed at two or more, or the HPA's, from two.
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if hpas:
        assert "replicas" not in gw["spec"]
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "t-taidon-gateway",
        }
        assert hpa["spec"]["minReplicas"] >= 2
    else:
        assert gw["spec"]["replicas"] >= 2


def test_services_reach_the_gateway_ports(rendered: tuple[str, list[Any]]) -> None:
    _, docs = rendered
    gw = one(docs, "Deployment", "t-taidon-gateway")
    labels = gw["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in gw["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(services) == {"t-taidon", "t-taidon-admin"}
    assert [p["targetPort"] for p in services["t-taidon"]["spec"]["ports"]] == ["postgres"]
    assert [p["targetPort"] for p in services["t-taidon-admin"]["spec"]["ports"]] == ["admin"]
    for svc in services.values():
        assert selects({"matchLabels": svc["spec"]["selector"]}, labels)
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_instance_and_builder_pods_accept_only_the_gateway_on_5432(
    rendered: tuple[str, list[Any]],
) -> None:
    name, docs = rendered
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    gateway_labels = one(docs, "Deployment", "t-taidon-gateway")["spec"]["template"]["metadata"][
        "labels"
    ]
    for component in ("instance", "builder"):
        # The labels the controller gives such pods (shared contract), and a stranger's.
        pod = {
            "app.kubernetes.io/name": "taidon",
            "app.kubernetes.io/component": component,
            "taidon.dev/instance": "x",
        }
        selecting = [p for p in policies if selects(p["spec"]["podSelector"], pod)]
        assert selecting, f"no NetworkPolicy selects {component} pods"
        for p in selecting:
            assert "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"]["ingress"]:
                assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
                assert rule["from"], "an ingress rule without `from` admits every pod"
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}  # no namespace or address blocks
                    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
                        "gateway"
                    )
                    assert selects(peer["podSelector"], gateway_labels)
                    stranger = {**gateway_labels, "app.kubernetes.io/component": "controller"}
                    assert not selects(peer["podSelector"], stranger)
        assert any(
            "Egress" in p["spec"]["policyTypes"] and p["spec"]["egress"] == [] for p in selecting
        ), f"{component} pods may open connections"
    gw_policy = one(docs, "NetworkPolicy", "t-taidon-gateway")
    assert selects(gw_policy["spec"]["podSelector"], gateway_labels)
    admin_port = VALUE_SETS[name].get("admin", {}).get("port", 8080)
    assert sorted(r["ports"][0]["port"] for r in gw_policy["spec"]["ingress"]) == [
        5432,
        admin_port,
    ]


def test_rbac_is_least_and_has_no_wildcards(rendered: tuple[str, list[Any]]) -> None:
    _, docs = rendered
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    for role in roles.values():
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["metadata"]["name"], rule)
            assert "resourceNames" not in rule or rule["resourceNames"]

    def allowed(role: str) -> set[tuple[str, str, str]]:
        return {
            (g, r, v)
            for rule in roles[role]["rules"]
            for g in rule["apiGroups"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }

    gateway = allowed("t-taidon-gateway")
    assert ("taidon.dev", "taidoninstances", "create") in gateway
    assert ("taidon.dev", "taidoninstances", "patch") in gateway  # the lease
    assert ("taidon.dev", "taidonstates", "create") in gateway
    assert ("", "secrets", "get") in gateway  # the per-instance credentials
    # Never the controller's work, never a way to read every Secret at once.
    assert not {r for _, r, _ in gateway} & {"pods", "persistentvolumeclaims", "volumesnapshots"}
    assert not {(r, v) for _, r, v in gateway if r == "secrets"} - {("secrets", "get")}
    controller = allowed("t-taidon-controller")
    for group, resource in (
        ("", "pods"),
        ("", "persistentvolumeclaims"),
        ("", "secrets"),
        ("snapshot.storage.k8s.io", "volumesnapshots"),
    ):
        for verb in ("get", "list", "watch", "create", "delete"):
            assert (group, resource, verb) in controller
    assert ("taidon.dev", "taidoninstances/status", "patch") in controller
    assert not {v for _, _, v in controller} & {"escalate", "bind", "impersonate"}
    # Each Deployment runs as the account its Role is bound to.
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for d, tpl in pods(docs):
        sa = tpl["spec"]["serviceAccountName"]
        assert sa in accounts
        binding = bindings[d["metadata"]["name"]]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": d["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}
        ]


def test_the_hpa_scales_on_a_gauge_the_gateway_serves(tmp_path: Path) -> None:
    hpa = one(render(REQUIRED, tmp_path), "HorizontalPodAutoscaler", "t-taidon-gateway")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "taidon_connections_open"
    source = (REPO / "taidon_proxy" / "admin" / "metrics.py").read_text()
    assert f'"{name}"' in source  # the gauge's name, as /metrics serves it
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 60}
    ]
    cpu = one(render(FULL, tmp_path), "HorizontalPodAutoscaler", "t-taidon-gateway")
    assert cpu["spec"]["metrics"][0]["resource"]["name"] == "cpu"


BAD_VALUES = {
    "no-snapshot-class": (
        {**REQUIRED, "runtime": {"storageClass": "x"}},
        "runtime.storageClass and runtime.snapshotClass are required",
    ),
    "no-metadata": ({**REQUIRED, "metadata": {}}, "set metadata.existingSecret"),
    "one-replica": ({**FIXED, "gateway": {"replicas": 1}}, "gateway.replicas: at least 2"),
    "hpa-min-1": (
        {**REQUIRED, "autoscaling": {"minReplicas": 1}},
        "autoscaling.minReplicas: at least 2",
    ),
    "bad-metric": (
        {**REQUIRED, "autoscaling": {"metric": "memory"}},
        "autoscaling.metric: connections or cpu",
    ),
    "no-auth": (
        {**REQUIRED, "auth": {"users": {}}},
        "auth.users (with auth.existingSecret) or config.teams",
    ),
    "no-auth-secret": (
        {**REQUIRED, "auth": {"users": {"app": "app"}}},
        "auth.existingSecret: the Secret holding",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_the_render_with_the_value_named(case: str, tmp_path: Path) -> None:
    values, message = BAD_VALUES[case]
    r = helm("template", "t", str(CHART), values=values, tmp=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_the_chart_takes_its_crds_from_deploy_crds() -> None:
    link = CHART / "crds"
    assert link.is_symlink() and link.resolve() == CRDS.resolve()


def test_the_crds_are_installed_with_the_chart(tmp_path: Path) -> None:
    docs = render(REQUIRED, tmp_path, "--include-crds")
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"taidoninstances.taidon.dev", "taidonstates.taidon.dev"}
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)


def test_the_kind_jobs_values_render_what_the_job_expects(tmp_path: Path) -> None:
    """examples/ci/kind-e2e.yml installs release `taidon` with examples/ci/kind/values.yaml."""
    values = yaml.safe_load((REPO / "examples" / "ci" / "kind" / "values.yaml").read_text())
    r = helm("template", "taidon", str(CHART), "--namespace", "taidon", values=values, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    one(docs, "Service", "taidon-taidon")  # the job's port-forward target
    gw = one(docs, "Deployment", "taidon-taidon-gateway")["spec"]["template"]["spec"]
    assert gw["containers"][0]["image"] == "taidon-proxy:e2e"
    assert gw["initContainers"][0]["name"] == "admin-token"
    assert gw["terminationGracePeriodSeconds"] == 3 + 20 + 15
    recipes = one(docs, "ConfigMap", "taidon-taidon-recipes")
    assert "create table note" in recipes["data"]["demo.sql"]


def test_the_controller_runs_its_entry_point_on_the_release_namespace(tmp_path: Path) -> None:
    """The controller pod starts `python -m taidon_proxy.k8s` with what it reads from its
    environment: the namespace its namespaced Role covers, kopf's health endpoint (the
    probes' port), the instance image."""
    docs = render(REQUIRED, tmp_path)
    (dep,) = [
        d for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"
    ]  # fmt: skip
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "taidon_proxy.k8s"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TAIDON_NAMESPACES"] == NAMESPACE
    assert env["TAIDON_LIVENESS"].endswith(":8081/healthz")
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert env["TAIDON_IMAGE"]
