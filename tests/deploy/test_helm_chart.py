"""The Helm chart (deploy/helm/pacs-agent).

Helm's own linter runs through Helm's Go SDK (helm-sdkpy: Helm v4 compiled into a shared
library, installed by ``make venv``): it loads the chart, checks its values against
values.schema.json and renders every template with them, as ``helm lint --strict`` does.
The ``helm`` command itself is in none of this CI machine's package sources (Debian 12 has no
helm package), so ``helm template`` with the rendered manifests validated against the
Kubernetes schemas (kubernetes-validate) runs only where ``helm`` is on PATH and is skipped
here, saying so. The SDK has no client-only rendering: a manifest is not rendered to text here.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers.paths import REPO
from tests.helpers.servers import require_services

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


#: Helm's lint severities (pkg/lint/support): info 1, warning 2, error 3.
INFO, WARNING, ERROR = 1, 2, 3


def _chart_with_values(tmp_path: Path, **env: str) -> Path:
    """A copy of the chart whose values.yaml holds what ``--set`` would give (the SDK's lint
    takes no values of its own)."""
    chart = tmp_path / "pacs-agent"
    shutil.copytree(CHART, chart)
    values = _values()
    values["secret"]["databaseUrl"] = "postgresql+psycopg://u:p@db/pacs_agent"
    values["secret"]["brokerUrl"] = "redis://redis:6379/0"
    values["env"].update(env)
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    return chart


def _sdk_lint(chart: Path) -> list[tuple[int, str]]:
    try:
        from helm_sdkpy import Configuration
        from helm_sdkpy.chart import Lint
    except ImportError:
        message = "helm-sdkpy is not installed (make venv installs it)"
        if require_services():
            pytest.fail(message)
        pytest.skip(message)
    result = asyncio.run(Lint(Configuration()).run(str(chart)))
    return [(int(m["Severity"]), str(m["Path"])) for m in result["Messages"]]


def test_helm_lints_the_chart_with_nothing_above_info(tmp_path: Path) -> None:
    chart = _chart_with_values(tmp_path, PACS_AGENT_LISTENER__ALLOW_ANY_CALLER="true")
    messages = _sdk_lint(chart)
    assert [m for m in messages if m[0] >= WARNING] == []


def test_helm_lint_catches_a_template_that_does_not_render(tmp_path: Path) -> None:
    chart = _chart_with_values(tmp_path, PACS_AGENT_LISTENER__ALLOW_ANY_CALLER="true")
    workers = chart / "templates" / "workers.yaml"
    workers.write_text(workers.read_text().replace("{{ $w.replicas }}", "{{ $w.replicas }"))
    assert (ERROR, "templates/") in _sdk_lint(chart)


def test_helm_lint_catches_values_that_break_the_schema(tmp_path: Path) -> None:
    chart = _chart_with_values(tmp_path, PACS_AGENT_LISTENER__ALLOW_ANY_CALLER="true")
    values = yaml.safe_load((chart / "values.yaml").read_text())
    values["listener"]["replicas"] = 2
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    assert any(sev == ERROR for sev, _ in _sdk_lint(chart))


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
