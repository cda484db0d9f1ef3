"""The Helm chart (deploy/helm/pacs-agent).

``helm lint`` and ``helm template`` need the helm binary, which none of the package sources
of this CI machine provides (Debian 12 has no helm package; PyPI's helm wrappers need Python
3.12 or another system): those tests run where helm is on PATH and are skipped here, saying
so. The rendered manifests are then validated against the Kubernetes schemas
(kubernetes-validate, pinned in requirements.lock). What always runs: the chart's values
against its own values.schema.json (which helm also enforces at lint, template and install).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers.paths import REPO

CHART = REPO / "deploy" / "helm" / "pacs-agent"
SECRETS = ["--set", "secret.databaseUrl=postgresql+psycopg://u:p@db/pacs_agent"]
SECRETS += ["--set", "secret.brokerUrl=redis://redis:6379/0"]
SECRETS += ["--set-string", "env.PACS_AGENT_LISTENER__ALLOW_ANY_CALLER=true"]


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def _helm() -> str:
    exe = shutil.which("helm")
    if exe is None:
        pytest.skip("helm is not installed on this machine (no package source here has it)")
    return exe


def test_the_default_values_match_the_chart_schema() -> None:
    jsonschema.Draft7Validator.check_schema(_schema())
    jsonschema.validate(_values(), _schema())


def test_the_schema_refuses_a_worker_without_a_queue_and_a_listener_scaled_out() -> None:
    values = _values()
    values["workers"]["inference"].pop("queues")
    with pytest.raises(jsonschema.ValidationError, match="'queues' is a required property"):
        jsonschema.validate(values, _schema())
    values = _values()
    values["listener"]["replicas"] = 2
    with pytest.raises(jsonschema.ValidationError, match="2 is greater than the maximum"):
        jsonschema.validate(values, _schema())


def test_the_inference_worker_asks_for_a_gpu_on_gpu_nodes() -> None:
    inference = _values()["workers"]["inference"]
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert inference["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert inference["imageSuffix"] == "worker-cuda"
    assert _values()["workers"]["io"]["imageSuffix"] == "listener"


def test_helm_refuses_a_listener_open_to_any_caller_unless_told(tmp_path: Path) -> None:
    out = subprocess.run(
        [_helm(), "template", "pacs", str(CHART), *SECRETS[:4]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "allowed_callers" in out.stderr


def test_helm_lint_passes() -> None:
    out = subprocess.run(
        [_helm(), "lint", "--strict", str(CHART), *SECRETS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_template_renders_manifests_that_kubernetes_schemas_accept(tmp_path: Path) -> None:
    out = subprocess.run(
        [_helm(), "template", "pacs", str(CHART), *SECRETS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert ("Job", "pacs-pacs-agent-migrate") in kinds
    assert ("Service", "pacs-pacs-agent-listener") in kinds
    assert {k for k, _ in kinds} >= {"Deployment", "PodDisruptionBudget", "ConfigMap", "Secret"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {
        "pacs-pacs-agent-listener",
        "pacs-pacs-agent-worker-inference",
        "pacs-pacs-agent-worker-io",
    }
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]

    import kubernetes_validate

    listener = deployments["pacs-pacs-agent-listener"]["spec"]["template"]["spec"]
    assert listener["securityContext"]["runAsNonRoot"] is True
    worker = deployments["pacs-pacs-agent-worker-inference"]["spec"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}

    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
