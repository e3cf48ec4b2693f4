"""examples/ci/kind-e2e.yml (the real-cluster job users run; never run here): it parses as
a GitHub Actions workflow, every script in it is valid bash, every repository file it names
exists, and the manifests and values it applies fit together."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.conftest import REPO

WORKFLOW = REPO / "examples" / "ci" / "kind-e2e.yml"
KIND = REPO / "examples" / "ci" / "kind"
# A path into this repository, as a script names it (relative to the checkout).
REPO_PATH = re.compile(r"(?<![\w/.-])((?:deploy|examples|docs|scripts|taidon_proxy)/[\w./-]*\w)")


def workflow() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return data


def steps() -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = workflow()["jobs"]["kind-e2e"]["steps"]
    return steps


def test_it_is_a_workflow_with_one_bounded_job() -> None:
    data = workflow()
    triggers = data.get("on", data.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "workflow_dispatch" in triggers
    job = data["jobs"]["kind-e2e"]
    assert job["runs-on"].startswith("ubuntu-")
    assert 0 < job["timeout-minutes"] <= 60
    uses = [s["uses"] for s in steps() if "uses" in s]
    assert uses[0].startswith("actions/checkout@")
    assert any(u.startswith("helm/kind-action@") for u in uses)
    for u in uses:
        assert re.fullmatch(r"[\w-]+/[\w-]+@v\d+", u), u  # pinned to a major version
    assert all("name" in s for s in steps()[1:])


def test_every_script_is_valid_bash() -> None:
    scripts = [s["run"] for s in steps() if "run" in s]
    assert len(scripts) >= 7
    for script in scripts:
        r = subprocess.run(  # noqa: PLW1510 - the code is read
            ["bash", "-n"], input=script, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, f"{r.stderr}\n--- in ---\n{script}"


def test_every_repository_file_it_names_exists() -> None:
    named = {m for s in steps() if "run" in s for m in REPO_PATH.findall(s["run"])}
    assert {
        "deploy/docker/Dockerfile",
        "deploy/helm/taidon",
        "examples/ci/kind/values.yaml",
        "examples/ci/kind/metadata-postgres.yaml",
    } <= named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, missing


def test_what_it_checks_is_what_the_chart_makes() -> None:
    text = WORKFLOW.read_text()
    # The job steps look for the shared contract's labels and the release's Service.
    for label in ("app.kubernetes.io/component=gateway", "app.kubernetes.io/component=instance"):
        assert label in text
    assert "helm install taidon deploy/helm/taidon" in text and "svc/taidon-taidon" in text
    assert "docker build -f deploy/docker/Dockerfile -t taidon-proxy:e2e ." in text
    values = yaml.safe_load((KIND / "values.yaml").read_text())
    assert values["image"] == {"repository": "taidon-proxy", "tag": "e2e", "pullPolicy": "Never"}
    # The Secrets the job creates are the ones the values name.
    assert f"create secret generic {values['auth']['existingSecret']} --from-literal=app=" in text
    assert f"create secret generic {values['admin']['tokenSecret']} --from-literal=token=" in text
    docs = [d for d in yaml.safe_load_all((KIND / "metadata-postgres.yaml").read_text()) if d]
    for d in docs:
        kubernetes_validate.validate(d, "1.30.0", strict=True)
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == values["metadata"]["existingSecret"]
    assert values["metadata"]["key"] in secret["stringData"]
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert f"@{svc['metadata']['name']}:5432/" in secret["stringData"]["dsn"]
    # The recipe file the config names is one the chart mounts from recipeFiles.
    (demo,) = values["config"]["databases"]["demo"]["prepare"]["files"]
    assert Path(demo).parent == Path("/etc/taidon/recipes")
    assert Path(demo).name in values["recipeFiles"]
